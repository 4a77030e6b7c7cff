"""DnD step 1: attention crops and D_top, the items that best activate each chosen neuron.

For neuron k (METHODS.md section 3.1): its `top_k` probe images by pooled activation are resized
to `size`x`size` and the neuron's spatial map is recomputed on each. The boxes follow the
reference implementation step by step, except for its uint8 overflow:

1. min-max normalise the map to [0, 1] in float32 (the reference casts raw activations to uint8,
   which wraps around above 255/255: not repeated), then scale as torchvision's `ToPILImage`
   does: `uint8(trunc(m * 255))` (255 only at the maximum);
2. resize that uint8 map to the image with PIL bicubic (`Image.resize`'s default);
3. binarise with Otsu's threshold on the 256-bin histogram, as OpenCV's `THRESH_OTSU`: the
   threshold t is the first bin maximising the between-class variance of {<= t} vs {> t}, and the
   foreground is `map > t`;
4. take the bounding boxes of the external contours (OpenCV `RETR_EXTERNAL`): one box per
   8-connected foreground region whose 4-connected background holes are filled, so a region
   nested inside another's hole gives no box of its own;
5. order them by bounding-box area, largest first; equal areas keep OpenCV's contour order
   (regions found later in a raster scan of their first pixel come first);
6. keep a box if its IoU with every kept box is <= `iou_max` and with the whole image is
   < `image_iou_max`, at most `max_per_image` boxes.

Crops are resized back to `size`x`size`. D_top = the neuron's `top_k` highest items among
originals and crops, all scored by the same forward pass at `size`. The maps are computed with a
plain resize to the network's input side instead of its resize + centre crop (a Compose, timm's
transforms or torchvision's `ImageClassification` preset alike), so that the map covers the whole
image the boxes refer to (see `square_transform`).

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
import torchvision.transforms as T
from PIL import Image

from .errors import NdUtilsError
from .hooks import trace_images

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), pixels

_FLT_EPSILON = float(np.finfo(np.float32).eps)


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


def heatmap_uint8(spatial_map: torch.Tensor, size: "int | tuple[int, int]") -> "np.ndarray | None":
    """The map as the reference thresholds it: `[H, W]` uint8 at the image size, or None.

    Normalised to [0, 1] (float32), scaled to 0..255 by truncation like torchvision's
    `ToPILImage` on a float tensor, then resized with PIL bicubic. `size` is the side of a square
    image or its `(width, height)`.
    """
    m = normalise_map(spatial_map)
    if m is None:
        return None
    u8 = (m.cpu() * 255).to(torch.uint8).numpy()  # float32 product, truncated (0..255)
    width, height = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(u8).resize((int(width), int(height)), Image.BICUBIC))


def otsu_threshold_uint8(image: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image as OpenCV computes it (foreground: `image > t`).

    t maximises the between-class variance of the classes {<= t} and {> t} over a 256-bin
    histogram; the first maximum wins; bins leaving a class with a weight below float32's
    epsilon are skipped; a one-valued image gives 0.
    """
    hist = np.bincount(np.asarray(image, dtype=np.uint8).ravel(), minlength=256)
    scale = 1.0 / float(hist.sum())
    mu = float(np.dot(np.arange(256, dtype=np.float64), hist.astype(np.float64))) * scale
    mu1 = q1 = max_sigma = 0.0
    best = 0
    for i, count in enumerate(hist.tolist()):
        p_i = count * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < _FLT_EPSILON or max(q1, q2) > 1.0 - _FLT_EPSILON:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > max_sigma:
            max_sigma, best = sigma, i
    return best


def external_boxes(mask: np.ndarray) -> list[Box]:
    """Bounding boxes of the external contours of a binary mask, largest box area first.

    Same boxes and order as OpenCV's `findContours(RETR_EXTERNAL)` + `boundingRect`, sorted
    stably by area descending: 8-connected foreground regions, holes (4-connected background not
    reaching the image border) filled, so nested regions vanish into their container; equal
    areas: the region whose first pixel comes later in raster order first.
    """
    from skimage.measure import label, regionprops

    mask = np.asarray(mask, dtype=bool)
    # background, 4-connected, with a background frame around the image: what is not the
    # frame's component is foreground or a hole in it
    background = label(np.pad(~mask, 1, constant_values=True), connectivity=1)
    filled = (background != background[0, 0])[1:-1, 1:-1]
    labels = label(filled, connectivity=2)
    ids, first = np.unique(labels.ravel(), return_index=True)
    first_pixel = dict(zip(ids.tolist(), first.tolist()))  # raster index of each region's start
    boxes = []
    for region in regionprops(labels):
        y0, x0, y1, x1 = (int(v) for v in region.bbox)
        boxes.append((-(x1 - x0) * (y1 - y0), -first_pixel[region.label], (x0, y0, x1, y1)))
    return [b for _, _, b in sorted(boxes)]


def select_boxes(boxes: list[Box], width: int, height: int, max_per_image: int = 4,
                 iou_max: float = 0.5, image_iou_max: float = 0.8) -> list[Box]:
    """Greedy pass over `boxes` in order: keep a box whose IoU with every kept box is
    <= `iou_max` and with the whole image `(0, 0, width, height)` is < `image_iou_max`."""
    whole = (0, 0, width, height)
    kept: list[Box] = []
    for box in boxes:
        if len(kept) >= max_per_image:
            break
        if box_iou(box, whole) < image_iou_max and all(box_iou(box, k) <= iou_max for k in kept):
            kept.append(box)
    return kept


def crop_boxes(spatial_map: torch.Tensor, size: int = 375, max_per_image: int = 4,
               iou_max: float = 0.5, image_iou_max: float = 0.8) -> list[Box]:
    """Crop boxes for one image from the neuron's spatial map `[h, w]` (any scale).

    Returns at most `max_per_image` boxes `(x0, y0, x1, y1)` in pixels of the `size`x`size`
    image, largest bounding box first (steps 1-6 of the module docstring).
    """
    heat = heatmap_uint8(spatial_map, size)
    if heat is None:
        return []
    mask = heat > otsu_threshold_uint8(heat)
    return select_boxes(external_boxes(mask), size, size, max_per_image, iou_max, image_iou_max)


def _side(size) -> int:
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def square_transform(preprocess, size: "int | None" = None):
    """The target's preprocessing with its resize + centre crop replaced by a plain square resize.

    Spatial maps must cover the whole image the boxes refer to; a centre crop would cut its
    border off. Understood: a torchvision `Compose` (also timm's, whose resize steps are its own
    classes), and torchvision's `ImageClassification` preset of pretrained weights (resize 256,
    crop 224, then to a float tensor and normalised). The side is the crop's (else `size`); the
    resize keeps the original's interpolation and antialias. Any other callable is kept as it is:
    it is assumed to show the whole image.

    Example:
        >>> from torchvision.models import ResNet50_Weights
        >>> tf = square_transform(ResNet50_Weights.IMAGENET1K_V1.transforms())
        >>> tf(Image.new("RGB", (375, 375))).shape     # the whole image, resized to 224x224
        torch.Size([3, 224, 224])
    """
    if isinstance(preprocess, T.Compose):
        steps, side, resize = [], size, None
        for t in preprocess.transforms:
            kind = type(t).__name__
            if isinstance(t, T.CenterCrop) or kind == "CenterCrop":
                side = _side(t.size)
            elif isinstance(t, T.Resize) or "Resize" in kind:  # timm's ResizeKeepRatio too
                resize = resize or t
            else:
                steps.append(t)
        if side is None:
            return preprocess
        return T.Compose([_square_resize(side, resize), *steps])
    if all(hasattr(preprocess, a) for a in ("crop_size", "resize_size", "mean", "std")):
        # torchvision.transforms._presets.ImageClassification (what `weights.transforms()` gives)
        side = _side(preprocess.crop_size) if size is None else int(size)
        return T.Compose([_square_resize(side, preprocess), T.PILToTensor(),
                          T.ConvertImageDtype(torch.float),
                          T.Normalize(mean=list(preprocess.mean), std=list(preprocess.std))])
    return preprocess


def _square_resize(side: int, like=None) -> T.Resize:
    """`Resize((side, side))` with the interpolation and antialias of the resize it replaces."""
    mode = getattr(like, "interpolation", T.InterpolationMode.BILINEAR)
    if not isinstance(mode, T.InterpolationMode):  # timm may hold a PIL constant or a name
        try:
            mode = T.InterpolationMode(str(mode).lower())
        except ValueError:
            mode = T.InterpolationMode.BILINEAR
    antialias = getattr(like, "antialias", True)
    return T.Resize((int(side), int(side)), interpolation=mode,
                    antialias=True if antialias is None else antialias)


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


def forward_maps(target, layer: str, images: list[Image.Image], pooling: str,
                 batch_size: int = 32) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """Pooled activations `[B, K]` and spatial maps `[B, K, h, w]` (None for vectors)."""
    if not images:
        return torch.zeros(0), None
    out = trace_images(target, [layer], images, pooling, keep_maps=[layer],
                       batch_size=batch_size, transform=square_transform(target.preprocess))
    return out.pooled[layer], spatial_maps(out.maps[layer], layer)


def pooled_activations(target, layer: str, images: list[Image.Image], pooling: str,
                       batch_size: int = 32) -> torch.Tensor:
    """Pooled activations `[B, K]` of `layer` on PIL images, with the square transform."""
    if not images:
        return torch.zeros(0)
    return trace_images(target, [layer], images, pooling, batch_size=batch_size,
                        transform=square_transform(target.preprocess)).pooled[layer]


__all__ = ["box_iou", "normalise_map", "heatmap_uint8", "otsu_threshold_uint8",
           "external_boxes", "select_boxes", "crop_boxes", "square_transform", "spatial_maps",
           "resize_square", "forward_maps", "pooled_activations"]
