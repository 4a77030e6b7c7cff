"""Stage 03a: D_top per chosen neuron, from the stage-01 cache plus attention crops.

Spatial maps are recomputed only for the images that some chosen neuron has among its top
`dnd.top_k` (the pooled cache says which), in one batched pass shared by all neurons of the
layer; the crops of all neurons then go through the target in a second batched pass.

The artifact holds `items.csv` (one row per original or crop: layer, unit, kind, image_id, box,
activation, in_top, rank, file) and the PNG of every item under `items/`.

Example:
    >>> top = build_top_images(cfg, "head", neurons=[0, 1])      # doctest: +SKIP
    >>> top.d_top(0)[["kind", "activation", "file"]]              # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .activations import activation_key, load_activations, load_probe_from_config
from ..attention_crops import crop_boxes, forward_maps, pooled_activations, resize_square
from ..config import Config
from ..context import run_context
from ..errors import NdUtilsError
from ..probe_set import ProbeSet
from ..stage_cache import (Stage, register_stage, StageOutput, cached_stage, stage_output,
                           stage_params)
from ..store import atomic_write_bytes, atomic_write_text, save_tensors
from ..backends.configured import load_target_from_config
from ..backends.target_network import Target

# Describe-and-Dissect (03-06); keys also carry the layer and the chosen neurons
# version 4: maps of torchvision-preset targets (ResNet-50) cover the whole image
STAGE = register_stage(Stage("03_top_images", "03_captions.ipynb", version=4,
                            reads=("dnd.top_k", "dnd.crops", "target.pooling"),
                            upstream=("01_activation_caching",)))


def choose_neurons(cfg: Config, layer: str, n_neurons: int) -> list[int]:
    """The units of `layer` named by `dnd.neurons`.

    A count (the first N units), a list of unit ids, or a mapping {layer: count or list}.
    """
    spec = run_context(cfg).settings.dnd.neurons
    if isinstance(spec, dict):
        if layer not in spec:
            raise NdUtilsError(f"dnd.neurons names layers {sorted(spec)} but not {layer!r}: add "
                               f"it, or give one count or list for every layer")
        spec = spec[layer]
    if isinstance(spec, bool) or spec is None:
        raise NdUtilsError(f"dnd.neurons must be a count or a list of unit ids, got {spec!r}")
    ids = list(range(min(int(spec), n_neurons))) if isinstance(spec, int) else spec
    return _check_units(ids, layer, n_neurons)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=1)  # 4x faster than 6, same size on photos
    return buf.getvalue()


def image_sha256(image: Image.Image) -> str:
    """Content hash of a decoded image (mode, size and pixels), the key of caption caches."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class TopImages:
    """D_top and crops of the chosen neurons of one layer (see the module docstring)."""

    layer: str
    neurons: list[int]
    items: pd.DataFrame
    path: Path
    key: str
    _maps: "torch.Tensor | None" = None

    def d_top(self, unit: int) -> pd.DataFrame:
        """The `dnd.top_k` items of `unit`, best first."""
        rows = self.items[(self.items.unit == unit) & self.items.in_top]
        return rows.sort_values("rank").reset_index(drop=True)

    def crops(self, unit: int) -> pd.DataFrame:
        return self.items[(self.items.unit == unit) & (self.items.kind == "crop")]

    def spatial_map(self, unit: int, image_id: int) -> "torch.Tensor | None":
        """The neuron's raw spatial map `[h, w]` on an original top image (None: vector layer)."""
        row = self.items[(self.items.unit == unit) & (self.items.image_id == image_id)
                         & (self.items.kind == "original")]
        if row.empty or int(row.map_index.iloc[0]) < 0:
            return None
        from safetensors.torch import load_file

        if self._maps is None:
            self._maps = load_file(str(self.path / "maps.safetensors"))["maps"]
        return self._maps[int(row.map_index.iloc[0])]

    def image(self, file: str) -> Image.Image:
        with Image.open(self.path / file) as im:
            return im.convert("RGB")


def top_images_output(cfg: Config, layer: str, neurons: list[int], probe: ProbeSet,
                      target: "Target | None" = None) -> StageOutput:
    return stage_output(STAGE, {**stage_params(cfg, STAGE), "layer": layer, "neurons": neurons},
                        upstream={"01_activation_caching":
                                  activation_key(cfg, layer, probe, target)})


def top_images_key(cfg: Config, layer: str, neurons: list[int], probe: ProbeSet,
                   target: "Target | None" = None) -> str:
    return top_images_output(cfg, layer, neurons, probe, target).key


def build_top_images(cfg: Config, layer: str, neurons: "list[int] | None" = None,
                     probe: "ProbeSet | None" = None, target: "Target | None" = None,
                     force: bool = False, progress: bool = True) -> TopImages:
    """Compute (or read) D_top with attention crops for `neurons` of `layer`."""
    ctx = run_context(cfg)
    probe = probe or load_probe_from_config(cfg)
    acts = load_activations(cfg, layer, probe=probe, target=target)  # names notebook 01 if absent
    neurons = neurons if neurons is not None else choose_neurons(cfg, layer, acts.n_neurons)
    neurons = _check_units(neurons, layer, acts.n_neurons)
    k = int(ctx.settings.dnd.top_k)
    if acts.top_ids.shape[1] < k:
        raise NdUtilsError(f"stage 01 stored {acts.top_ids.shape[1]} top images per neuron but "
                           f"dnd.top_k is {k}: raise activations.top_k and rerun notebook 01")

    def build(tmp: Path) -> None:
        model = (target or load_target_from_config(cfg)).to(ctx.device)
        table = _compute(cfg, layer, neurons, probe, acts, model, tmp, progress)
        atomic_write_text(tmp / "items.csv", table.to_csv(index=False))

    art = cached_stage(ctx.store,
                       top_images_output(cfg, layer, neurons, probe, target), build, force=force,
                       extra={"layer": layer, "n_neurons": len(neurons)})
    items = pd.read_csv(art.file("items.csv"), keep_default_na=False)
    return TopImages(layer, neurons, items, art.path, art.key)


def _check_units(neurons, layer: str, n: int) -> list[int]:
    ids = [int(u) for u in neurons]
    bad = [u for u in ids if not 0 <= u < n]
    if bad:
        raise NdUtilsError(f"neuron id(s) {bad} are outside layer {layer!r}, which has units "
                           f"0..{n - 1}: fix dnd.neurons")
    return sorted(dict.fromkeys(ids))


def _compute(cfg: Config, layer: str, neurons: list[int], probe: ProbeSet, acts, target: Target,
             out: Path, progress: bool) -> pd.DataFrame:
    s = run_context(cfg).settings
    k, crops = int(s.dnd.top_k), s.dnd.crops
    size = int(crops.size)
    pooling = s.target.pooling
    batch = int(s.activations.batch_size)
    wanted = {u: [int(i) for i in acts.top_ids[u, :k]] for u in neurons}
    image_ids = sorted({i for ids in wanted.values() for i in ids})
    images = {i: resize_square(probe.load_image(i), size)
              for i in tqdm(image_ids, desc=f"{layer}: top images", disable=not progress)}
    pooled, maps = forward_maps(target, layer, [images[i] for i in image_ids], pooling, batch)
    pos = {i: j for j, i in enumerate(image_ids)}
    rows, crop_images, kept_maps = [], [], []
    (out / "items").mkdir(exist_ok=True)
    for u in neurons:
        for i in wanted[u]:
            rows.append({"layer": layer, "unit": u, "kind": "original", "image_id": i,
                         "box": "", "activation": float(pooled[pos[i], u]),
                         "map_index": len(kept_maps) if maps is not None else -1})
            if maps is None:  # vector layer: no crops
                continue
            kept_maps.append(maps[pos[i], u])
            for box in crop_boxes(maps[pos[i], u], size=size,
                                  max_per_image=int(crops.max_per_image),
                                  iou_max=float(crops.iou_max),
                                  image_iou_max=float(crops.image_iou_max)):
                crop_images.append(images[i].crop(box).resize((size, size), Image.BICUBIC))
                rows.append({"layer": layer, "unit": u, "kind": "crop", "image_id": i,
                             "box": ",".join(map(str, box)), "activation": float("nan"),
                             "map_index": -1})
    if crop_images:
        crop_acts = pooled_activations(target, layer, crop_images, pooling, batch)
        crop_rows = [r for r in rows if r["kind"] == "crop"]
        for r, a in zip(crop_rows, crop_acts):
            r["activation"] = float(a[r["unit"]])
    table = pd.DataFrame(rows)
    table["in_top"] = False
    table["rank"] = 0
    for u in neurons:
        idx = table.index[table.unit == u]
        order = table.loc[idx, "activation"].sort_values(ascending=False, kind="stable").index[:k]
        table.loc[order, "in_top"] = True
        table.loc[order, "rank"] = range(1, len(order) + 1)
    files, crop_iter = [], iter(crop_images)
    for r in table.itertuples():
        im = images[r.image_id] if r.kind == "original" else next(crop_iter)
        name = f"items/{r.unit}_{r.image_id}_{r.Index}.png"
        if r.kind == "original" and not r.in_top:
            name = ""  # an original pushed out of D_top by crops is still in the probe set
        else:
            atomic_write_bytes(out / name, png_bytes(im))
        files.append(name)
    table["file"] = files
    table["probe_path"] = [probe.items[i].path for i in table.image_id]
    if kept_maps:  # raw spatial maps of the originals, for overlays in figures and the explorer
        save_tensors({"maps": torch.stack(kept_maps).float().contiguous()},
                     out / "maps.safetensors")
    return table
