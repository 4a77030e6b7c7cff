"""Forward hooks as context managers, pooling inside the hook.

`TraceLayers` registers one forward hook per named layer, pools each output as soon as it is
produced (so full feature maps are never kept unless asked for) and removes every hook on exit,
also when the forward pass raises.

`trace_images` is the one loop that sends images through a target under such a trace: every
stage that needs activations of images (decode-once caching, attention crops, concept images)
goes through it or, for one ready batch, through `trace_batch`.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> with TraceLayers(net, ["0", "1"], pooling="avg") as trace:
    ...     _ = net(torch.randn(2, 3, 16, 16))
    >>> trace["1"].shape
    torch.Size([2, 8])
    >>> trace_batch(net, ["1"], torch.randn(3, 3, 16, 16)).pooled["1"].shape
    torch.Size([3, 8])
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import NdUtilsError, unknown_name

POOLINGS: dict[int, tuple[str, ...]] = {
    4: ("avg", "max"),          # conv maps [B, C, H, W]
    3: ("cls", "avg", "max"),   # token sequences [B, T, D]
    2: ("identity",),           # vectors [B, D]
}


def apply_pooling(output: torch.Tensor, pooling: str, layer: str = "?") -> torch.Tensor:
    """Reduce one layer output to one value per neuron.

    Shapes: [B, C, H, W] -> [B, C] (`avg` spatial mean, `max` spatial max);
    [B, T, D] -> [B, D] (`cls` token 0, `avg`/`max` over tokens); [B, D] -> [B, D] (any pooling:
    vectors are already per neuron). Returns float32.
    """
    if isinstance(output, (tuple, list)):
        # Transformer blocks often return (hidden_states, attn, ...): the tensor comes first.
        output = output[0]
    if not torch.is_tensor(output):
        raise NdUtilsError(f"layer {layer!r} returns {type(output).__name__}, not a tensor: hook "
                           f"a submodule that returns a tensor")
    rank = output.dim()
    if rank == 2:
        return output.float()
    if rank not in POOLINGS:
        raise NdUtilsError(f"layer {layer!r} gives a rank-{rank} output {tuple(output.shape)}; "
                           f"only rank 2 (vectors), 3 (tokens) and 4 (conv maps) are supported")
    valid = POOLINGS[rank]
    if pooling not in valid:
        kind = "conv map" if rank == 4 else "token sequence"
        raise NdUtilsError(
            f"pooling {pooling!r} does not apply to layer {layer!r}, a {kind} of shape "
            f"{tuple(output.shape)}: use one of {', '.join(valid)} (config key target.pooling)")
    if rank == 4:
        flat = output.flatten(2)
        out = flat.mean(2) if pooling == "avg" else flat.amax(2)
    elif pooling == "cls":
        out = output[:, 0]
    else:
        out = output.mean(1) if pooling == "avg" else output.amax(1)
    return out.float()


def resolve_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Map layer names to submodules with `get_submodule` (never `eval`)."""
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            valid = [n for n, _ in model.named_modules() if n]
            raise unknown_name("layer", name, valid) from None
    return found


class TraceLayers:
    """Context manager recording the (pooled) outputs of several layers in one forward pass.

    Args:
        model: the network.
        layers: layer names (`model.get_submodule` paths).
        pooling: pooling for every layer, or {layer: pooling}.
        keep_maps: layers whose raw output is also kept (e.g. spatial maps for crops).
        detach: detach outputs from the graph.

    After a forward, `trace[name]` is the pooled `[B, K]` float32 tensor and
    `trace.maps[name]` the raw output when kept. A layer called more than once per forward
    keeps its last call, with a warning (its name is ambiguous).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str],
                 pooling: "str | Mapping[str, str]" = "avg",
                 keep_maps: Iterable[str] = (), detach: bool = True):
        self.model = model
        self.modules = resolve_layers(model, list(layers))
        self.pooling = pooling
        self.keep_maps = set(keep_maps)
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self.maps: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list = []

    def _pooling_for(self, name: str) -> str:
        return self.pooling[name] if isinstance(self.pooling, Mapping) else self.pooling

    def _make_hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            self._calls[name] = self._calls.get(name, 0) + 1
            out = output.detach() if self.detach and torch.is_tensor(output) else output
            self.outputs[name] = apply_pooling(out, self._pooling_for(name), name)
            if name in self.keep_maps:
                self.maps[name] = out
        return hook

    def reset(self) -> None:
        self.outputs.clear()
        self.maps.clear()
        self._calls.clear()

    def __enter__(self) -> "TraceLayers":
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this trace registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise NdUtilsError(f"layer {name!r} produced no output in the last forward pass: it "
                               f"is not on the path the model's forward takes")
        return self.outputs[name]

    def check_calls(self) -> None:
        """Warn about layers that fired more than once in the last forward."""
        for name, n in self._calls.items():
            if n > 1:
                warnings.warn(f"layer {name!r} ran {n} times in one forward pass; its last call "
                              f"is recorded. Hook a module that runs once.", stacklevel=2)


def count_hooks(model: nn.Module) -> int:
    """Number of forward hooks registered anywhere in `model` (tests use it)."""
    return sum(len(m._forward_hooks) for m in model.modules())


@dataclass
class ImageTrace:
    """Outputs of `trace_images` / `trace_batch`, in image order.

    `pooled[layer]`: `[N, K]` float32 on the CPU; `maps[layer]`: the raw output (e.g.
    `[N, C, H, W]`) of each layer in `keep_maps`, on the CPU.
    """

    pooled: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)


@torch.no_grad()
def trace_batch(model: nn.Module, layers: Sequence[str], x: torch.Tensor,
                pooling: "str | Mapping[str, str]" = "avg", keep_maps: Iterable[str] = (),
                check_calls: bool = False) -> ImageTrace:
    """One forward pass of the ready batch `x` `[B, 3, H, W]` with every layer traced.

    Tensors stay on the model's device (the caller moves them); `check_calls` warns about a
    layer that ran more than once.
    """
    with TraceLayers(model, layers, pooling=pooling, keep_maps=keep_maps) as trace:
        model(x)
    if check_calls:
        trace.check_calls()
    # a block returning (hidden states, ...) keeps the tensor, as `apply_pooling` does
    maps = {k: v[0] if isinstance(v, (tuple, list)) else v for k, v in trace.maps.items()}
    return ImageTrace({layer: trace[layer] for layer in layers}, maps)


def _as_image(item):
    from PIL import Image

    if isinstance(item, (str, Path)):
        with Image.open(item) as im:
            return im.convert("RGB")
    return item


@torch.no_grad()
def trace_images(target, layers: Sequence[str], images: Sequence, pooling="avg",
                 keep_maps: Iterable[str] = (), batch_size: int = 32,
                 transform: "Callable | None" = None,
                 each_batch: "Callable[[list], None] | None" = None,
                 progress: "Callable[[Iterable], Iterable] | None" = None) -> ImageTrace:
    """Pooled activations `[N, K]` of `layers` of a `Target` on images (PIL or file paths).

    `transform` (default `target.preprocess`) turns an image into a `[3, H, W]` tensor; the
    images of each batch are stacked, moved to the target's device and run once with all
    `layers` traced. `each_batch(pil_images)` sees every batch's decoded images (e.g. to embed
    them with another model without decoding them twice); `progress` wraps the batch starts
    (e.g. a tqdm). An empty `images` gives `[0, 0]` tensors.

    Example:
        >>> t = trace_images(target, ["fc"], ["a.jpg", "b.jpg"])        # doctest: +SKIP
        >>> t.pooled["fc"].shape                                        # doctest: +SKIP
        torch.Size([2, 1000])
    """
    layers, keep = list(layers), list(keep_maps)
    transform = transform or target.preprocess
    pooled: dict = {layer: [] for layer in layers}
    maps: dict = {layer: [] for layer in keep}
    starts = range(0, len(images), int(batch_size))
    for start in (progress(starts) if progress else starts):
        pil = [_as_image(im) for im in images[start:start + int(batch_size)]]
        x = torch.stack([transform(im) for im in pil]).to(target.device)
        out = trace_batch(target.model, layers, x, pooling=pooling, keep_maps=keep)
        for layer in layers:
            pooled[layer].append(out.pooled[layer].cpu())
        for layer in keep:
            maps[layer].append(out.maps[layer].cpu())
        if each_batch is not None:
            each_batch(pil)
    empty = torch.zeros(0, 0)
    return ImageTrace({layer: torch.cat(v) if v else empty for layer, v in pooled.items()},
                      {layer: torch.cat(v) if v else empty for layer, v in maps.items()})
