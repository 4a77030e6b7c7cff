"""Attention crop boxes against a re-implementation of the reference procedure (issue 10.1).

The reference (Describe-and-Dissect, `get_attention_crops`) turns the neuron's map into a PIL image
with torchvision's `ToPILImage` (float * 255, truncated to uint8), resizes it with PIL's default
filter, binarises it with OpenCV's Otsu (`THRESH_BINARY + THRESH_OTSU`: foreground = value > t),
takes `boundingRect` of the `findContours(RETR_EXTERNAL)` contours, sorts them stably by box area
(largest first) and keeps up to 4 with IoU <= 0.5 against every kept box and < 0.8 against the
image. `reference_boxes` below redoes those steps from that description without OpenCV (it is not
a dependency), with the one documented fix: the map is min-max normalised before the uint8
conversion (the reference converts raw activations, which wraps around).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label

from nd_utils.attention_crops import (crop_boxes, external_boxes, heatmap_uint8,
                                      otsu_threshold_uint8, select_boxes)

SIZE = 375


# ------------------------------------------------------------------ synthetic spatial maps
def synthetic_maps(n: int = 150, seed: int = 10) -> list[torch.Tensor]:
    """Smooth maps: 1-7 Gaussian blobs of several widths and positions on grids of 7x7 to 14x14,
    at activation scales from 0.05 to 60 (many above 1, where the reference's uint8 cast wraps)."""
    rng = np.random.default_rng(seed)
    sides = (7, 12, 14, 7, 12, 14, 10, 9)
    maps = []
    for i in range(n):
        h = w = sides[i % len(sides)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        m = np.zeros((h, w))
        widest = h / 3 if i % 2 else h / 6  # every other map: small blobs only
        for _ in range(rng.integers(1, 8)):
            cy, cx = rng.uniform(-1, h), rng.uniform(-1, w)
            sy, sx = rng.uniform(0.4, widest, size=2)
            blob = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
            m += rng.uniform(0.2, 1.0) * blob
        m = m * rng.choice([0.05, 1.0, 7.0, 60.0]) + rng.uniform(0, 0.5)
        maps.append(torch.tensor(m, dtype=torch.float32))
    return maps


# ------------------------------------------------------------------ the reference, re-implemented
def iou(box, other):
    x1, y1, x2, y2 = box
    cx1, cy1, cx2, cy2 = other
    overlap = max(0, min(cx2, x2) - max(cx1, x1)) * max(0, min(cy2, y2) - max(cy1, y1))
    union = abs(x2 - x1) * abs(y2 - y1) + abs(cx2 - cx1) * abs(cy2 - cy1) - overlap
    return overlap / union


def external_contour_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """`findContours(RETR_EXTERNAL)` + `boundingRect`, in OpenCV's output order, without OpenCV.

    Contour following joins foreground pixels 8-connected and background 4-connected, with a
    zero frame around the image. A region has an external contour iff it borders the background
    that reaches the frame; regions inside another region's hole have none. OpenCV lists the
    contours found last (raster order of their first pixel) first.
    """
    fg = label(mask, connectivity=2)
    padded_bg = np.pad(~mask, 1, constant_values=True)
    outside = label(padded_bg, connectivity=1)
    outside = (outside == outside[0, 0])[1:-1, 1:-1]
    near_outside = np.zeros_like(mask)  # foreground pixels with a 4-neighbour outside
    padded_out = np.pad(outside, 1, constant_values=True)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        near_outside |= padded_out[1 + dy:1 + dy + mask.shape[0], 1 + dx:1 + dx + mask.shape[1]]
    near_outside &= mask
    found = []
    for lab in range(1, fg.max() + 1):
        region = fg == lab
        if not (region & near_outside).any():
            continue  # nested in a hole: no external contour
        ys, xs = np.nonzero(region)
        first = int(np.flatnonzero(region.ravel())[0])
        found.append((first, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    found.sort()
    return [box for _, box in reversed(found)]


def reference_boxes(spatial_map: torch.Tensor, size: int = SIZE, num_crops: int = 4):
    m = spatial_map.float()
    m = (m - m.min()) / (m.max() - m.min())  # the fix: normalise before the uint8 cast
    heatmap = T.ToPILImage()(m)  # float * 255 -> uint8
    heatmap = np.array(heatmap.resize([size, size]))  # PIL's default filter
    mask = heatmap > threshold_otsu(heatmap)
    boxes = external_contour_boxes(mask)
    boxes = sorted(boxes, key=lambda b: -abs(b[2] - b[0]) * abs(b[3] - b[1]))  # stable
    kept = []
    for box in boxes:
        if len(kept) == num_crops:
            break
        if all(iou(box, k) <= 0.5 for k in kept) and iou(box, (0, 0, size, size)) < 0.8:
            kept.append(box)
    return kept


# ------------------------------------------------------------------ the 150-map comparison
@pytest.fixture(scope="module")
def maps():
    return synthetic_maps()


def test_boxes_identical_to_the_reference_on_150_synthetic_maps(maps):
    ours = [crop_boxes(m, size=SIZE) for m in maps]
    ref = [reference_boxes(m) for m in maps]
    differing = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert differing == []
    # the set is not trivial: empty, single and several boxes, and the count limit are all hit
    counts = [len(b) for b in ours]
    assert counts.count(0) < 10 and counts.count(1) > 10 and counts.count(2) > 10
    assert max(counts) == 4


def test_reference_overflow_is_not_repeated(maps):
    # Boxes do not depend on the map's scale or offset; the reference's raw cast does: its
    # uint8 map wraps around wherever activation * 255 passes 255, and differs from ours.
    m = maps[3]
    assert crop_boxes(m * 40 + 5, size=SIZE) == crop_boxes(m * 0.01, size=SIZE) == \
        crop_boxes(m, size=SIZE) == reference_boxes(m)
    raw = m * 40 / m.max()  # activations up to 40
    wrapped = np.array(T.ToPILImage()(raw))  # the reference's cast, overflow included
    ours = heatmap_uint8(raw, tuple(raw.shape[::-1]))
    assert ours.max() == 255 and not np.array_equal(wrapped, ours)
    scaled = (raw - raw.min()) / (raw.max() - raw.min())
    assert np.array_equal(ours, np.array(T.ToPILImage()(scaled)))


def test_matches_opencv_when_it_is_installed(maps):
    """The same 150 maps through the reference's own OpenCV calls (skipped without OpenCV)."""
    cv2 = pytest.importorskip("cv2")
    for m in maps:
        heat = heatmap_uint8(m, SIZE)
        _, binary = cv2.threshold(heat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert np.array_equal(binary > 0, heat > otsu_threshold_uint8(heat))
        cnts = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cnts = cnts[0] if len(cnts) == 2 else cnts[1]
        boxes = [(x, y, x + w, y + h) for x, y, w, h in map(cv2.boundingRect, cnts)]
        boxes = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        assert external_boxes(binary > 0) == boxes
        assert crop_boxes(m, size=SIZE) == select_boxes(boxes, SIZE, SIZE)


# ------------------------------------------------------------------ each step's convention
def test_uint8_scaling_truncates_like_to_pil_image():
    m = torch.tensor([[0.0, 0.5, 1.0], [0.999, 0.004, 2 / 255], [100 / 255, 0.25, 0.75]])
    heat = heatmap_uint8(m, (3, 3))  # same size: PIL keeps the values
    assert heat.dtype == np.uint8
    assert np.array_equal(heat, np.array(T.ToPILImage()(m)))
    assert heat.tolist() == [[0, 127, 255], [254, 1, 2], [100, 63, 191]]
    assert heatmap_uint8(torch.full((4, 4), 2.0), 10) is None  # constant map: nothing to crop


def test_resize_is_pil_bicubic_of_the_uint8_map():
    m = synthetic_maps(3, seed=4)[2]
    small = np.array(T.ToPILImage()((m - m.min()) / (m.max() - m.min())))
    expected = np.array(Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC))
    assert np.array_equal(heatmap_uint8(m, SIZE), expected)
    # bicubic overshoot is clipped to 0..255, not wrapped
    assert heatmap_uint8(m, SIZE).max() == 255 and heatmap_uint8(m, SIZE).min() == 0


def test_otsu_foreground_is_strictly_above_the_threshold():
    # two values: the threshold is the lower one, so only the upper one is foreground
    img = np.array([[10] * 6 + [200] * 3], dtype=np.uint8)
    t = otsu_threshold_uint8(img)
    assert t == 10 and (img > t).sum() == 3
    # a hand-computed case: values 0, 1, 2, 3 with counts 4, 1, 1, 4 -> split {0, 1} | {2, 3}
    img = np.repeat(np.array([0, 1, 2, 3], dtype=np.uint8), [4, 1, 1, 4])[None]
    assert otsu_threshold_uint8(img) == 1
    assert otsu_threshold_uint8(np.full((3, 3), 7, dtype=np.uint8)) == 0  # one value: as OpenCV


def test_otsu_masks_agree_with_skimage_on_uint8():
    rng = np.random.default_rng(1)
    for _ in range(60):
        centres = rng.integers(0, 256, size=rng.integers(1, 4))
        img = np.concatenate([np.clip(rng.normal(c, rng.uniform(1, 40), size=rng.integers(50, 900)),
                                      0, 255) for c in centres]).astype(np.uint8)
        if img.min() == img.max():
            continue
        assert np.array_equal(img > otsu_threshold_uint8(img), img > threshold_otsu(img))


def test_external_boxes_follow_opencv_contours():
    ring = np.zeros((20, 20), dtype=bool)
    ring[2:15, 2:15] = True
    ring[4:13, 4:13] = False
    ring[7:9, 7:9] = True  # a region inside the hole has no external contour
    assert external_boxes(ring) == [(2, 2, 15, 15)]
    corner_cut = ring.copy()
    corner_cut[2, 2] = corner_cut[3, 3] = False  # background only diagonally linked: still a hole
    assert external_boxes(corner_cut) == [(2, 2, 15, 15)]
    opened = ring.copy()
    opened[2:4, 8] = False  # a 4-connected gap: the inner region is outside now
    assert external_boxes(opened) == [(2, 2, 15, 15), (7, 7, 9, 9)]
    diagonal = np.zeros((10, 10), dtype=bool)
    diagonal[1, 1] = diagonal[2, 2] = diagonal[3, 3] = diagonal[3, 6] = True  # 8-connected
    assert external_boxes(diagonal) == [(1, 1, 4, 4), (6, 3, 7, 4)]
    for mask in (ring, corner_cut, opened, diagonal):
        assert external_boxes(mask) == sorted(
            external_contour_boxes(mask), key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


def test_equal_areas_keep_opencv_contour_order():
    # OpenCV returns the contour found last in its raster scan first; the sort is stable
    m = np.zeros((20, 20), dtype=bool)
    m[2:5, 2:5] = m[2:5, 10:13] = m[10:13, 1:4] = m[9:12, 15:18] = True
    assert external_boxes(m) == [(1, 10, 4, 13), (15, 9, 18, 12), (10, 2, 13, 5), (2, 2, 5, 5)]
    m[0:8, 14:19] = True  # a larger box goes first whatever its position
    assert external_boxes(m)[0] == (14, 0, 19, 8)


def test_box_selection_rules():
    boxes = [(0, 0, 100, 100), (10, 10, 100, 100), (0, 0, 50, 50), (200, 200, 250, 250),
             (100, 100, 150, 150), (300, 0, 320, 20), (0, 300, 20, 320)]
    # (10, 10, 100, 100) overlaps the first one with IoU 0.81: dropped; limit 4
    assert select_boxes(boxes, 375, 375) == [(0, 0, 100, 100), (0, 0, 50, 50),
                                             (200, 200, 250, 250), (100, 100, 150, 150)]
    assert select_boxes(boxes, 375, 375, max_per_image=0) == []
    # IoU exactly 0.5 is kept; IoU with the image of 0.8 or more is not
    assert select_boxes([(0, 0, 100, 100), (0, 0, 100, 50)], 375, 375) == [(0, 0, 100, 100),
                                                                            (0, 0, 100, 50)]
    assert select_boxes([(0, 0, 100, 80), (0, 0, 10, 10)], 100, 100) == [(0, 0, 10, 10)]


def _edge_hot_image(size: int = 375, strip: int = 24) -> Image.Image:
    """Black, with a bright vertical strip along the left edge (outside ResNet's centre crop)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, :strip] = 255
    return Image.fromarray(pixels)


def test_square_transform_of_torchvision_presets_keeps_the_edges():
    """`weights.transforms()` is no Compose: its centre crop must go too (issue 20)."""
    from torchvision.models import ResNet50_Weights

    from nd_utils.attention_crops import square_transform

    preset = ResNet50_Weights.IMAGENET1K_V1.transforms()
    image = _edge_hot_image()
    cropped, square = preset(image), square_transform(preset)(image)
    assert cropped.shape == square.shape == (3, 224, 224)
    bright = (1 - 0.485) / 0.229  # channel 0 of a white pixel after Normalize
    assert float(cropped[0, :, :5].max()) < 0  # the centre crop cut the strip off
    assert float(square[0, 100, :10].min()) > bright - 0.1  # the whole image is there
    plain = T.Compose([T.Resize((224, 224), antialias=True), T.ToTensor(),
                       T.Normalize(preset.mean, preset.std)])(image)
    assert torch.allclose(square, plain, atol=1e-5)
    # a Compose with a resize and a centre crop is rewritten the same way; one without is kept
    compose = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                         T.Normalize(preset.mean, preset.std)])
    assert torch.allclose(square_transform(compose)(image), plain, atol=1e-5)
    whole = T.Compose([T.ToTensor()])
    assert square_transform(whole) is whole


def test_crop_box_finds_a_hot_spot_at_the_edge_with_the_resnet_preset():
    """Through `forward_maps`: a map of brightness puts the box on the left strip."""
    from torchvision.models import ResNet50_Weights

    from nd_utils import from_module
    from nd_utils.attention_crops import crop_boxes, forward_maps

    # mean brightness over 32x32 cells: a 7x7 map of a 224 input
    target = from_module(torch.nn.Sequential(torch.nn.AvgPool2d(32)),
                         ResNet50_Weights.IMAGENET1K_V1.transforms(), name="brightness")
    _, maps = forward_maps(target, "0", [_edge_hot_image()], pooling="avg")
    boxes = crop_boxes(maps[0, 0], size=375)
    assert boxes and boxes[0][0] == 0 and boxes[0][2] <= 120  # on the strip, at the left edge
