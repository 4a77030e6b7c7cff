"""The Target type: a frozen network to dissect, its preprocessing and a cache-safe weights id.

A :class:`Target` bundles a model (eval mode, frozen), the preprocessing that turns
a PIL image into the tensor the model expects, a ``weights_id`` that is safe to use
in cache keys, and optional class names for the output logits. :func:`from_module` wraps a
user ``nn.Module`` as one; the registry of pretrained targets is :mod:`nd_utils.backends.targets`.

Example:
    >>> t = from_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), T.ToTensor())
    >>> t.layer_names()     # ['0', '1']
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import unknown_name
from ..machine import resolve_device

__all__ = ["Target", "from_module"]


@dataclass
class Target:
    """A frozen network plus everything needed to feed it images.

    ``preprocess`` maps a PIL RGB image to a FloatTensor ``[3, H, W]``; the model
    takes a batch ``[B, 3, H, W]``.

    Example:
        >>> t = load_target("resnet18:none")
        >>> t.get_layer("layer4")
    """

    name: str
    model: nn.Module
    preprocess: Callable
    weights_id: str
    class_names: list[str] | None = None
    input_size: int | None = None
    metadata: dict = field(default_factory=dict)

    def layer_names(self) -> list[str]:
        """Dotted names of all submodules in registration order, e.g. ``['stem', 'stem.0', ...]``."""
        return [n for n, _ in self.model.named_modules() if n]

    def get_layer(self, name: str) -> nn.Module:
        """Return the submodule called ``name``; unknown names list the closest valid ones."""
        try:
            if name:  # "" would be the whole model, which is not a layer
                return self.model.get_submodule(name)
        except AttributeError:
            pass
        raise unknown_name("layer", name, self.layer_names(),
                           hint=f"List them with load_target({self.name!r}).layer_names().")

    def to(self, device: str | torch.device) -> "Target":
        """Move the model to ``device`` (``"auto"`` allowed) and return self."""
        self.model.to(resolve_device(device))
        return self

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter or buffer (CPU if it has none)."""
        for t in (*self.model.parameters(), *self.model.buffers()):
            return t.device
        return torch.device("cpu")


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state_dict_hash(module: nn.Module) -> str:
    """First 16 hex chars of a sha256 over sorted (name, dtype, shape, bytes) of the state_dict."""
    h = hashlib.sha256()
    # Parameter-free modules (ReLU, pooling) would otherwise hash alike across architectures.
    for mod_name, mod in module.named_modules():
        h.update(f"{mod_name}={type(mod).__qualname__};".encode())
    for key, t in sorted(module.state_dict().items()):
        t = t.detach()
        if t.is_quantized:
            t = t.dequantize()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A uint8 view hashes the raw bytes of any dtype, bfloat16 included.
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def from_module(module: nn.Module, preprocess: Callable, name: str = "custom",
                class_names: list[str] | None = None, weights_id: str | None = None,
                input_size: int | None = None) -> Target:
    """Wrap a user ``nn.Module`` (frozen, eval mode) as a Target.

    ``preprocess`` maps a PIL image to ``[3, H, W]``. Without ``weights_id`` one is
    derived from the weights, so cache keys change whenever a weight does.

    Example:
        >>> t = from_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), T.ToTensor())
        >>> t.layer_names()     # ['0', '1']
    """
    module.eval()
    module.requires_grad_(False)
    return Target(
        name=name, model=module, preprocess=preprocess,
        weights_id=weights_id or _state_dict_hash(module),
        class_names=list(class_names) if class_names is not None else None,
        input_size=input_size,
        metadata={"source": "user", "num_params": _num_params(module)})
