"""Stage 01b: the probe set's vision-language image features `[N, D]` (L2-normalised).

They share stage 01's decode-once pass over the probe images (`image_feature_job` joins
`cache_activations`), and are read by CLIP-Dissect (02), the retrieval synthesizer (05) and the
evaluations (07, 08). A split part of a probe set reads rows of the whole set's features.

Example:
    >>> jobs = image_feature_jobs_if_missing(cfg, probe)               # doctest: +SKIP
    >>> cache_activations(cfg, probe=probe, extra_jobs=jobs)            # doctest: +SKIP
    >>> load_image_features(cfg, probe).shape                           # doctest: +SKIP
    torch.Size([1000, 384])
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from ..backends.configured import load_vlm_from_config, vlm_dtype
from ..backends.vlm import VisionLanguageModel
from ..config import Config
from ..context import run_context
from ..decode_once import CacheJob
from ..probe_set import ProbeSet
from ..stage_cache import Stage, register_stage, StageOutput, stage_output, stage_params

# the vision-language image features share stage 01's decode-once pass over the probe set
IMAGE_STAGE = register_stage(Stage("01_image_features", "01_activation_caching.ipynb", version=1,
                                  reads=("vlm.name", "probe.sets", "probe.limit")))


def cfg_for_root(cfg: Config, probe: ProbeSet) -> Config:
    """`cfg` with the split removed from `probe.sets`, so keys are those of the whole set."""
    if probe.parent is None:
        return cfg
    specs = [{k: v for k, v in s.model_dump(exclude_unset=True).items() if k != "split"}
             for s in run_context(cfg).settings.probe.sets]
    return cfg.with_overrides({"probe.sets": specs})


def vlm_key_params(cfg: Config) -> dict:
    """What the VLM settings add to a features key besides `vlm.name`: `vlm.dtype` when it is
    not float32 (it changes the features), nothing otherwise, so float32 keys stay as they were.
    `vlm.batch_size` is never in a key, as `activations.batch_size` is not."""
    dtype = vlm_dtype(cfg)
    return {} if dtype == "float32" else {"vlm.dtype": dtype}


def image_feature_output(cfg: Config, probe: ProbeSet) -> StageOutput:
    return stage_output(IMAGE_STAGE, {**stage_params(cfg, IMAGE_STAGE), **vlm_key_params(cfg)},
                        inputs={"probe_fingerprint": probe.fingerprint})


def image_feature_key(cfg: Config, probe: ProbeSet) -> str:
    return image_feature_output(cfg, probe).key


def image_feature_job(cfg: Config, vlm: VisionLanguageModel, probe: ProbeSet) -> CacheJob:
    """A decode-once job caching the probe set's L2-normalised image features `[N, D]`; the
    encoder sees at most `vlm.batch_size` images per call (the pass cuts its own batches)."""
    batch = int(run_context(cfg).settings.vlm.batch_size)
    return CacheJob.for_output(image_feature_output(cfg, probe),
                               vlm.image_consumer(batch), "image_features",
                               extra={"vlm": vlm.name, "backend_id": vlm.backend_id})


def load_image_features(cfg: Config, probe: ProbeSet) -> torch.Tensor:
    """Cached image features `[N, D]` of the probe set; missing ones name notebook 01."""
    if probe.parent is not None:  # a split part: rows of the whole set's features
        whole = load_image_features(cfg_for_root(cfg, probe), probe.parent)
        return whole[torch.as_tensor(probe.parent_ids, dtype=torch.long)]
    ctx = run_context(cfg)
    art = ctx.store.open(
        IMAGE_STAGE.name, image_feature_key(cfg, probe),
        produced_by=f"notebooks/{IMAGE_STAGE.notebook} (image features of "
                    f"{ctx.settings.vlm.name!r})")
    return load_file(str(art.file("activations.safetensors")))["activations"]


def image_feature_jobs_if_missing(cfg: Config, probe: ProbeSet,
                                  vlm: "VisionLanguageModel | None" = None,
                                  force: bool = False) -> list[CacheJob]:
    """`[image_feature_job]` when the probe's image features are not cached yet (or `force`).

    Lets notebook 01 add the vision-language encoder to its decode-once pass without loading
    the model when its output already exists; `cache_activations(..., force=True)` then
    recomputes the job it is given.
    """
    if probe.parent is not None:
        raise ValueError("image_feature_jobs_if_missing: pass the whole probe set (probe.root "
                         "with activations.cfg_for_root(cfg, probe)); a split part has no "
                         "features of its own")
    if not force and run_context(cfg).store.exists(IMAGE_STAGE.name,
                                                   image_feature_key(cfg, probe)):
        return []
    return [image_feature_job(cfg, vlm or load_vlm_from_config(cfg), probe)]
