"""Device choice and seeding, shared by every stage."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(device: "str | torch.device | None" = "auto") -> torch.device:
    """`"auto"`/None -> CUDA when present, else CPU; any other value is passed to torch.device.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available here: "
                           f"set device: auto (or cpu) in the config")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so reruns give the same numbers."""
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
