"""Device choice, seeding and the process's memory allocator, shared by every stage."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# numpy and torch are imported inside the functions: `import nd_utils` runs this module first,
# and must stay light (see nd_utils/__init__.py).


def resolve_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """`"auto"`/None -> CUDA when present, else CPU; any other value is passed to torch.device.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available here: "
                           f"set device: auto (or cpu) in the config")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so reruns give the same numbers."""
    import numpy as np
    import torch

    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# mallopt(3) parameter numbers of glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_ALLOCATOR_TUNED: "bool | None" = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every block above 32 MB (a batch of conv activations, a similarity
    matrix) with a fresh mmap and unmaps it on free, so the next batch faults in and zeroes the
    same pages again. On a small VM that page-faulting cost more than the arithmetic: an
    EfficientNet-Lite0 forward pass took 69 ms per image against 28 ms with freed memory kept
    (`benchmarks/bench_allocator.py`). The price is that the resident size stays at its peak
    until the process ends.

    Called once when `nd_utils` is imported (so every notebook kernel and DataLoader worker
    forked from it is tuned); `ND_MALLOC_TUNING=0` keeps glibc's defaults. Returns whether the
    settings are in effect (False on other platforms or C libraries).

    >>> isinstance(keep_freed_memory(), bool)
    True
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    if os.environ.get("ND_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    big = 2**31 - 1
    # a fixed mmap threshold also switches off glibc's dynamic one; trim / top pad keep the heap
    _ALLOCATOR_TUNED = all(mallopt(param, value) == 1 for param, value in
                           ((_M_MMAP_THRESHOLD, big), (_M_TRIM_THRESHOLD, big),
                            (_M_TOP_PAD, 256 * 2**20)))
    return _ALLOCATOR_TUNED


def config_device(cfg) -> "torch.device":
    """The device a config's stages compute on: its `device` key (auto/cpu/cuda) resolved."""
    return resolve_device(cfg.get("device", "auto"))


def pins_memory(device: "str | torch.device") -> bool:
    """Whether a DataLoader feeding `device` should pin its batches: only for CUDA, where pinned
    pages make `.to(device, non_blocking=True)` an asynchronous copy (for CPU work it is a copy
    for nothing).

    >>> pins_memory("cpu")
    False
    """
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def free_memory(device: "str | torch.device") -> "int | None":
    """Bytes a new allocation on CUDA `device` can take: the driver's free memory plus what torch's
    caching allocator holds unused. None for any other device (no figure is used there)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(dev)[0]
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


def fit_chunk(item_bytes: int, *, device: "str | torch.device", hi: int, fixed_bytes: int = 0,
              lo: int = 1, margin: float = 0.5, free_bytes: "int | None" = None) -> int:
    """Items per chunk so that `fixed_bytes + chunk * item_bytes <= margin * free memory`.

    The free figure is `free_bytes`, else `free_memory(device)` (CUDA); the result lies in
    [lo, hi] (`lo` even when not even that fits: the caller's out-of-memory handling takes over),
    and is `hi` where there is no figure (CPU). The margin leaves room for the allocator's
    fragmentation and the temporaries no estimate counts.

    >>> fit_chunk(10**6, device="cuda", hi=4096, free_bytes=2 * 10**9)   # half of 2 GB / 1 MB
    1000
    >>> fit_chunk(10**6, device="cpu", hi=4096)
    4096
    """
    free = free_bytes if free_bytes is not None else free_memory(device)
    if free is None:
        return max(lo, hi)
    budget = margin * free - fixed_bytes
    return int(min(hi, max(lo, budget // max(1, item_bytes))))
