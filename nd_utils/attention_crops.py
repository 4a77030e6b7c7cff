"""DnD step 1: attention crops and D_top, the items that best activate each chosen neuron.

For neuron k (METHODS.md section 3.1): its `top_k` probe images by pooled activation are resized
to `size`x`size`; the neuron's spatial map on each is normalised to [0, 1] (not cast to uint8,
which overflows in the reference), upsampled to the image, binarised at Otsu's threshold; the
bounding boxes of the connected regions (= external contours) are taken largest first and kept
while their IoU with every kept box is <= `iou_max` and with the whole image < `image_iou_max`,
at most `max_per_image`. Crops are resized back to `size`x`size`. D_top = the neuron's `top_k`
highest items among originals and crops, all scored by the same forward pass at `size`.

Vector layers (fc) get no crops: D_top is the cached top images. Token layers `[B, T, D]` (ViT)
take their map from the patch tokens (token 0 = CLS is dropped), reshaped to the patch grid.

Example:
    >>> boxes = crop_boxes(spatial_map=torch.rand(7, 7), size=375)   # doctest: +SKIP
    >>> [(x0, y0, x1, y1), ...]                                     # doctest: +SKIP
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from .errors import NdUtilsError
from .hooks import TraceLayers

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), pixels


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes `(x0, y0, x1, y1)`."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def normalise_map(spatial_map: torch.Tensor) -> "torch.Tensor | None":
    """Min-max scale a `[h, w]` map to [0, 1]; None for a constant map (nothing to crop)."""
    m = spatial_map.detach().float()
    lo, hi = m.min(), m.max()
    if not torch.isfinite(hi - lo) or float(hi - lo) <= 1e-12:
        return None
    return (m - lo) / (hi - lo)


def crop_boxes(spatial_map: torch.Tensor, size: int = 375, max_per_image: int = 4,
               iou_max: float = 0.5, image_iou_max: float = 0.8) -> list[Box]:
    """Crop boxes for one image from the neuron's spatial map `[h, w]` (any scale).

    Returns at most `max_per_image` boxes in pixels of the `size`x`size` image, largest first.
    """
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    m = normalise_map(spatial_map)
    if m is None:
        return []
    up = F.interpolate(m[None, None], size=(size, size), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    try:
        mask = up > threshold_otsu(up)
    except ValueError:  # a two-valued map can defeat Otsu; nothing sensible to crop then
        return []
    # External contours of a binary mask enclose its 8-connected regions, holes included:
    # their bounding boxes are the regions' boxes, their areas the filled areas.
    regions = sorted(regionprops(label(mask, connectivity=2)),
                     key=lambda r: (-int(r.area_filled), r.bbox))
    whole = (0, 0, size, size)
    kept: list[Box] = []
    for r in regions:
        y0, x0, y1, x1 = (int(v) for v in r.bbox)
        box = (x0, y0, x1, y1)
        if box_iou(box, whole) >= image_iou_max:
            continue
        if all(box_iou(box, k) <= iou_max for k in kept):
            kept.append(box)
        if len(kept) == max_per_image:
            break
    return kept


def square_transform(preprocess, size: "int | None" = None):
    """The target's preprocessing with its resize + centre crop replaced by a plain resize.

    Spatial maps must cover the whole `size`x`size` image that the boxes refer to; a centre crop
    would cut its border off. Transforms that are not a torchvision Compose are kept as they are.
    """
    if not isinstance(preprocess, T.Compose):
        return preprocess
    steps, side = [], size
    for t in preprocess.transforms:
        if isinstance(t, T.CenterCrop):
            side = t.size[0] if isinstance(t.size, (tuple, list)) else t.size
        elif not isinstance(t, T.Resize):
            steps.append(t)
    if side is None:
        return preprocess
    return T.Compose([T.Resize((int(side), int(side)),
                               interpolation=T.InterpolationMode.BILINEAR), *steps])


def spatial_maps(output: torch.Tensor, layer: str = "?") -> "torch.Tensor | None":
    """Per-neuron spatial maps `[B, K, h, w]` from a layer output; None for vectors `[B, K]`.

    Conv maps `[B, C, H, W]` are returned as they are; token sequences `[B, T, D]` drop token 0
    (CLS) when the rest forms a square grid, and are reshaped to `[B, D, g, g]`.
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 2:
        return None
    if output.dim() == 4:
        return output.float()
    if output.dim() == 3:
        b, t, d = output.shape
        for skip in (1, 0):
            g = math.isqrt(t - skip)
            if g * g == t - skip and g > 0:
                return output[:, skip:, :].float().transpose(1, 2).reshape(b, d, g, g)
        raise NdUtilsError(f"layer {layer!r} has {t} tokens, which is neither a square patch grid "
                           f"nor one plus a square: its spatial map is unknown, so no crops")
    raise NdUtilsError(f"layer {layer!r} gives a rank-{output.dim()} output; no spatial map")


def resize_square(image: Image.Image, size: int) -> Image.Image:
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


@torch.no_grad()
def forward_maps(target, layer: str, images: list[Image.Image], pooling: str,
                 batch_size: int = 32) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """Pooled activations `[B, K]` and spatial maps `[B, K, h, w]` (None for vectors)."""
    transform = square_transform(target.preprocess)
    pooled, maps = [], []
    device = target.device
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(device)
        with TraceLayers(target.model, [layer], pooling=pooling, keep_maps=[layer]) as trace:
            target.model(batch)
        pooled.append(trace[layer].cpu())
        m = spatial_maps(trace.maps[layer], layer)
        maps.append(None if m is None else m.cpu())
    if not pooled:
        return torch.zeros(0), None
    return torch.cat(pooled), (None if maps[0] is None else torch.cat(maps))


@torch.no_grad()
def pooled_activations(target, layer: str, images: list[Image.Image], pooling: str,
                       batch_size: int = 32) -> torch.Tensor:
    """Pooled activations `[B, K]` of `layer` on PIL images, with the square transform."""
    transform = square_transform(target.preprocess)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start:start + batch_size]])
        with TraceLayers(target.model, [layer], pooling=pooling) as trace:
            target.model(batch.to(target.device))
        out.append(trace[layer].cpu())
    return torch.cat(out) if out else torch.zeros(0)


__all__ = ["box_iou", "normalise_map", "crop_boxes", "square_transform", "spatial_maps",
           "resize_square", "forward_maps", "pooled_activations"]
