"""Stage 01: cache the pooled activations of a target network's layers over a probe set.

Each layer is its own artifact (key = target, layer, pooling, probe content, top_k), so adding a
layer to the config computes only that layer, while all missing layers share one forward pass.

Example:
    >>> cfg = load_config("offline")                                  # doctest: +SKIP
    >>> cached = cache_activations(cfg)                               # doctest: +SKIP
    >>> acts = load_activations(cfg, "head")                          # doctest: +SKIP
    >>> acts.activations.shape, acts.top_ids.shape                    # doctest: +SKIP
    (torch.Size([92, 1280]), torch.Size([1280, 50]))
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from ..config import Config
from ..context import run_context
from ..decode_once import CacheJob, run_decode_once
from ..errors import NdUtilsError
from ..hooks import trace_batch, trace_images
from ..notices import record_notice
from ..probes import load_probes
from ..probe_set import ProbeSet
from .image_features import IMAGE_STAGE, cfg_for_root, image_feature_job
from ..stage_cache import Stage, register_stage, StageOutput, stage_output, stage_params
from ..store import Artifact
from ..backends.configured import load_target_from_config
from ..backends.target_network import Target
from ..backends.targets import is_pinned, is_random_init, random_init_id

# v2: top images merged chunk by chunk, equal activations by ascending image index and NaN
# last (torch.topk over the whole layer left ties unspecified and put NaN first)
STAGE = register_stage(Stage("01_activation_caching", "01_activation_caching.ipynb", version=2,
                            reads=("target.name", "target.pooling", "probe.sets", "probe.limit",
                                   "activations.top_k")))


class TargetConsumer:
    """Runs the target once per batch and returns the pooled `[B, K]` output of each layer."""

    def __init__(self, target: Target, layers: list[str], pooling: str = "avg"):
        for layer in layers:
            target.get_layer(layer)  # unknown names fail here, listing the closest ones
        self.target, self.outputs, self.pooling = target, list(layers), pooling
        self.name = f"target:{target.name}"
        self.preprocess = target.preprocess
        self._checked = False

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = trace_batch(self.target.model, self.outputs, batch, pooling=self.pooling,
                          check_calls=not self._checked)
        self._checked = True
        return out.pooled


def load_probe_from_config(cfg: Config) -> ProbeSet:
    """The probe set named by `probe.sets` (their union), cut to `probe.limit` images if set."""
    s = run_context(cfg).settings
    probe = load_probes([spec.model_dump(exclude_unset=True) for spec in s.probe.sets])
    limit = s.probe.limit
    if limit is not None:
        if int(limit) < 1:
            raise NdUtilsError(f"probe.limit must be a positive number of images or null, got {limit}")
        probe = probe.subset(int(limit))
    return probe


def target_identity(cfg: Config, target: "Target | None" = None) -> str:
    """What identifies the target's weights in cache keys.

    A registry name that pins its weights (`resnet50:IMAGENET1K_V1`, `efficientnet-lite0`) is
    enough, so later stages find the cache without loading the model; so is `arch:none` with the
    config's `seed` (`random_init_id`). Any other target (a user module) is identified by the
    hash of its weights, which needs the Target itself.
    """
    s = run_context(cfg).settings
    name = s.target.name
    if target is None or target.name == name:
        if is_pinned(name):
            return name
        if is_random_init(name):  # a given Target names the seed it was drawn with
            return target.weights_id if target is not None else random_init_id(name, s.seed)
    if target is None:
        raise NdUtilsError(
            f"target {name!r} is not a registry name with pinned weights, so its caches are "
            f"keyed by its weights: pass the Target (e.g. from nd.from_module) as target=")
    return target.weights_id


def activation_output(cfg: Config, layer: str, probe: ProbeSet,
                      target: "Target | None" = None) -> StageOutput:
    """What decides one layer's activations: config fields read, weights, probe content."""
    return stage_output(STAGE, {**stage_params(cfg, STAGE), "layer": layer},
                        inputs={"probe_fingerprint": probe.fingerprint,
                                "target": target_identity(cfg, target)})


def activation_key(cfg: Config, layer: str, probe: ProbeSet,
                   target: "Target | None" = None) -> str:
    """Artifact key of one layer's activations (`activation_output(...).key`)."""
    return activation_output(cfg, layer, probe, target).key


def activation_jobs(cfg: Config, target: Target, probe: ProbeSet,
                    layers: "list[str] | None" = None) -> list[CacheJob]:
    """One CacheJob per layer for `run_decode_once` (other consumers may join the same pass)."""
    s = run_context(cfg).settings
    layers = list(layers or s.target.layers)
    consumer = TargetConsumer(target, layers, s.target.pooling)
    return [CacheJob.for_output(
        activation_output(cfg, layer, probe, target), consumer, layer,
        top_k=int(s.activations.top_k),
        extra={"layer": layer, "target": target.name, "weights_id": target.weights_id,
               "device": str(next(target.model.parameters()).device)}) for layer in layers]


def cache_activations(cfg: Config, target: "Target | None" = None, probe: "ProbeSet | None" = None,
                      extra_jobs: "list[CacheJob] | None" = None, force: bool = False,
                      progress: bool = True, stop_after_chunks: "int | None" = None
                      ) -> dict[str, Artifact]:
    """Cache every layer of `target.layers` (plus `extra_jobs`) in one decode-once pass.

    Returns {layer: Artifact}; finished layers are read from the store, not recomputed, unless
    `force`. The artifact holds `activations.safetensors` (`activations` [N, K] float32,
    `top_ids`/`top_values` [K, top_k]) and `images.csv` (id, path, label, ...).
    """
    ctx = run_context(cfg)
    s, device = ctx.settings, ctx.device
    probe = probe or load_probe_from_config(cfg)
    if probe.parent is not None:  # a split part reads the whole set's caches
        if extra_jobs:
            raise NdUtilsError("cache_activations: pass the whole probe set (probe.root) when "
                               "adding extra jobs for a split part")
        return cache_activations(cfg_for_root(cfg, probe), target, probe.root, force=force,
                                 progress=progress, stop_after_chunks=stop_after_chunks)
    target = (target or load_target_from_config(cfg)).to(device)
    store = ctx.store
    jobs = activation_jobs(cfg, target, probe) + list(extra_jobs or [])
    if force:
        for job in jobs:
            store.remove(job.stage, job.key)
    warn_if_disk_short(cfg, target, probe, [j for j in jobs if not store.exists(j.stage, j.key)])
    found = run_decode_once(
        probe, jobs, store, batch_size=int(s.activations.batch_size),
        chunk_size=int(s.activations.chunk_size),
        num_workers=int(s.activations.num_workers), device=device, progress=progress,
        stop_after_chunks=stop_after_chunks, run_chunks=chunks_on_executor(cfg, progress))
    return {job.output: found[(job.stage, job.key)] for job in jobs}


def warn_if_disk_short(cfg: Config, target: Target, probe: ProbeSet, jobs: list) -> None:
    """Before stage 01 writes `jobs`: their size (images x the layers' pooled widths, from one
    blank image's forward pass, plus image features) against the free space of `data_dir`; a
    warning and a run notice when it is short (`run_faults.check_free_space`)."""
    from ..run_faults import check_free_space, human_bytes, stage01_bytes

    if not jobs or not len(probe):
        return
    from PIL import Image

    layers = [j.output for j in jobs if j.stage == STAGE.name]
    try:  # a blank image: probe images are decoded once, by the pass itself
        blank = Image.new("RGB", (224, 224))
        traced = trace_images(target, layers, [blank], run_context(cfg).settings.target.pooling,
                              batch_size=1) if layers else None
    except Exception:  # noqa: BLE001 - an estimate must never stop the pass (it reports errors)
        return
    widths = {layer: int(traced.pooled[layer].shape[1]) for layer in layers}
    need = stage01_bytes(len(probe), widths, n_feature_jobs=len(jobs) - len(layers))
    message = check_free_space(cfg.data_dir, need, f"stage 01 ({len(probe):,} images x "
                               f"{sum(widths.values()):,} neurons, {human_bytes(need)} at its "
                               f"peak)")
    if message:

        record_notice("disk_space", message, stage="01")


def chunks_on_executor(cfg: Config, progress: bool = True):
    """`run_chunks` for `run_decode_once` when `executor.name` is not local (else None): one
    unit per chunk of `activations.chunk_size` images of `cfg`'s probe set
    (`activation_chunk_unit`)."""
    ex = run_context(cfg).executor
    if ex.name == "local":
        return None
    return lambda plan: ex.map(partial(activation_chunk_unit, cfg), plan,
                               desc="activation chunks", progress=progress)


def activation_chunk_unit(cfg: Config, item: tuple) -> dict:
    """One unit of stage 01 on a worker: chunk `(c, lo, hi, [(stage, key, staging), ...],
    batch_size)` of the configured probe set through the jobs named, written into their staging
    folders, in the driver's batches.

    The worker rebuilds the jobs from `cfg` (target, and the VLM when image features are
    wanted), each loaded once per process; a job whose key differs from the driver's (other
    weights or probe files on this node) is an error, never a silent mix.
    """
    import time

    from ..backends.configured import load_target_from_config, load_vlm_from_config
    from ..decode_once import compute_chunk
    from ..executors import worker_model

    c, lo, hi, wanted, batch_size = item
    probe = worker_model("probe", cfg, lambda: load_probe_from_config(cfg))
    jobs = []
    if any(stage == STAGE.name for stage, _, _ in wanted):
        target = worker_model("target", cfg, lambda: load_target_from_config(cfg))
        jobs += activation_jobs(cfg, target, probe)
    if any(stage == IMAGE_STAGE.name for stage, _, _ in wanted):
        vlm = worker_model("vlm", cfg, lambda: load_vlm_from_config(cfg))
        jobs.append(image_feature_job(cfg, vlm, probe))
    by_key = {(j.stage, j.key): j for j in jobs}
    missing = [f"{stage}/{key}" for stage, key, _ in wanted if (stage, key) not in by_key]
    if missing:
        raise NdUtilsError(f"worker computed other keys than the driver for {', '.join(missing)}"
                           f": every node needs the same probe files and weights")
    need = [by_key[(stage, key)] for stage, key, _ in wanted]
    stagings = {id(by_key[(stage, key)]): Path(staging) for stage, key, staging in wanted}
    t0 = time.time()
    compute_chunk(probe, need, stagings, c, lo, hi, batch_size=int(batch_size),
                  num_workers=int(run_context(cfg).settings.activations.num_workers),
                  device=run_context(cfg).device)
    return {"seconds": time.time() - t0, "images": hi - lo}


@dataclass
class LayerActivations:
    """Cached activations of one layer: `activations` [N, K], `top_ids`/`top_values` [K, k]."""

    layer: str
    activations: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor
    images: pd.DataFrame
    manifest: dict
    path: Path

    @property
    def n_images(self) -> int:
        return self.activations.shape[0]

    @property
    def n_neurons(self) -> int:
        return self.activations.shape[1]


def load_activations(cfg: Config, layer: str, probe: "ProbeSet | None" = None,
                     target: "Target | None" = None) -> LayerActivations:
    """Read one layer's cached activations; a missing cache names notebook 01.

    `target` is needed only for targets outside the registry (see `target_identity`).
    """
    probe = probe or load_probe_from_config(cfg)
    if probe.parent is not None:
        return part_view(load_activations(cfg_for_root(cfg, probe), layer, probe.parent, target),
                         probe)
    art = run_context(cfg).store.open(STAGE.name, activation_key(cfg, layer, probe, target),
                     produced_by=f"notebooks/{STAGE.notebook} (layer {layer!r})")
    tensors = load_file(str(art.file("activations.safetensors")))
    images = pd.read_csv(art.file("images.csv"), keep_default_na=False, dtype={"label": str})
    return LayerActivations(layer, tensors["activations"], tensors["top_ids"],
                            tensors["top_values"], images, art.manifest, art.path)


def part_view(full: LayerActivations, part: ProbeSet) -> LayerActivations:
    """The rows `part.parent_ids` of a whole probe set's activations, with the part's own top
    images (`top_ids` are ids within the part, as long as the stored top-k allows)."""
    ids = torch.as_tensor(part.parent_ids, dtype=torch.long)
    acts = full.activations[ids]
    k = min(full.top_ids.shape[1], acts.shape[0])
    # a stable sort keeps ties in id order, as the decode-once pass does
    order = torch.sort(acts.T, dim=1, descending=True, stable=True)
    images = full.images.iloc[ids.numpy()].reset_index(drop=True)
    if "id" in images.columns:
        images["id"] = range(len(images))
    return LayerActivations(full.layer, acts, order.indices[:, :k].contiguous(),
                            order.values[:, :k].contiguous(), images,
                            {**full.manifest, "part": part.params.get("split", {})}, full.path)


def activation_summary(acts: "dict[str, LayerActivations]") -> pd.DataFrame:
    """One row per cached layer: size, key, timings (for the notebook and the run report)."""
    rows = []
    for layer, a in acts.items():
        m = a.manifest
        t = m.get("timings", {})
        rate = t.get("images_processed", 0) / t["decode_and_forward_s"] if t.get(
            "decode_and_forward_s") else float("nan")
        rows.append({"layer": layer, "images": a.n_images, "neurons": a.n_neurons,
                     "top_k": a.top_ids.shape[1], "key": m["key"], "device": m.get("device"),
                     "images_per_s": round(rate, 1), "skipped_images": len(m["skipped_images"]),
                     "folder": str(a.path)})
    return pd.DataFrame(rows)
