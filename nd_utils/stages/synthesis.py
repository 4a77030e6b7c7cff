"""Stage 05: images of each candidate concept (DnD step 3), cached per concept across neurons.

The backends (`diffusers`: Stable Diffusion as in the paper; `retrieve`: the offline stand-in
that returns the pool photos closest to the prompt) are in `nd_utils.backends.synthesizers`;
`load_synthesizer_from_config` builds the configured one, caching the retrieval pool's image
features first.

One artifact per (backend, model, prompt, settings, seed): a concept proposed for ten neurons, or
in ten runs, is synthesised once.

Example:
    >>> synth = load_synthesizer_from_config(cfg)                      # doctest: +SKIP
    >>> images = concept_images(cfg, ["red-themed scenes"], synth)     # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd

from .activations import load_probe_from_config
from .image_features import cfg_for_root
from ..backends.configured import load_vlm_from_config
from .image_features import (IMAGE_STAGE, image_feature_jobs_if_missing, image_feature_key,
                             load_image_features)
from ..backends.synthesizers import load_synthesizer
from ..config import Config
from ..context import run_context
from ..decode_once import run_decode_once
from ..errors import ProbeError
from ..backends.families import FAMILIES
from ..probes import load_probes
from ..probe_set import ProbeSet
from ..stage_cache import (Stage, register_stage, StageOutput, cached_stage, stage_output,
                           stage_params)
from ..store import atomic_write_bytes, atomic_write_text
from .top_images import png_bytes

# one artifact per (backend, model, prompt, settings, seed): shared by neurons and runs
STAGE = register_stage(Stage("05_concept_images", "05_synthesis.ipynb", version=1,
                            reads=("synthesis.name", "synthesis.model", "synthesis.prompt",
                                   "synthesis.images_per_concept", "synthesis.steps", "synthesis.scheduler",
                                   "synthesis.guidance_scale", "synthesis.height", "synthesis.width", "seed")))


def load_pool(cfg: Config) -> tuple[ProbeSet, str]:
    """The retrieval pool `synthesis.pool`; falls back to the probe set (with a warning)."""
    try:
        pool = run_context(cfg).settings.synthesis.pool
        return load_probes([p.model_dump(exclude_unset=True) for p in pool]), "synthesis.pool"
    except ProbeError as exc:
        warnings.warn(f"retrieval pool unavailable ({exc}); retrieving from the probe set "
                      f"instead, so concept images can repeat probe images", stacklevel=2)
        return load_probe_from_config(cfg), "probe.sets (fallback)"


def load_synthesizer_from_config(cfg: Config, vlm=None):
    """The `synthesis.*` backend; `retrieve` also caches the pool's image features. A backend
    gets, besides, the extra keys of `synthesis:` it takes (a registered one's own settings)."""
    ctx = run_context(cfg)
    s = ctx.settings.synthesis
    name = s.name
    own = FAMILIES["synthesis"].extra_settings(s)
    if name == "diffusers":
        return load_synthesizer(name, model=s.model, device=ctx.device, steps=s.steps,
                                scheduler=s.scheduler, guidance_scale=s.guidance_scale,
                                height=s.height, width=s.width, batch_size=s.batch_size, **own)
    if name == "retrieve":
        pool, source, pcfg = pool_config(cfg)
        vlm = vlm or load_vlm_from_config(cfg)
        cache_pool_features(cfg, vlm, pool, pcfg)
        synth = load_synthesizer(name, cfg=cfg, pool=pool,
                                 pool_features=load_image_features(pcfg, pool), vlm=vlm, **own)
        synth.pool_source = source
        return synth
    return load_synthesizer(name, **own)  # a registered user backend, or UnknownNameError


def pool_config(cfg: Config) -> "tuple[ProbeSet, str, Config]":
    """The retrieval pool, where it came from, and `cfg` with it as the probe set."""
    pool, source = load_pool(cfg)
    s = run_context(cfg).settings
    specs = s.synthesis.pool if source == "synthesis.pool" else s.probe.sets
    pcfg = cfg.with_overrides({"probe.sets": [p.model_dump(exclude_unset=True) for p in specs],
                               "probe.limit": None})
    return pool, source, pcfg


def cache_pool_features(cfg: Config, vlm=None, pool=None, pcfg=None, run_chunks=None) -> None:
    """Cache the retrieval pool's image features when missing (the VLM loads only then).

    A split part of a pool reads the whole pool's features (computed once, shared with 07).
    `run_chunks`: an executor's fan-out of the pass (`activations.chunks_on_executor`).
    """
    if pool is None:
        pool, _, pcfg = pool_config(cfg)
    root_cfg = cfg_for_root(pcfg, pool)
    ctx = run_context(cfg)
    store = ctx.store
    if store.exists(IMAGE_STAGE.name, image_feature_key(root_cfg, pool.root)):
        return
    jobs = image_feature_jobs_if_missing(root_cfg, pool.root, vlm or load_vlm_from_config(cfg))
    run_decode_once(pool.root, jobs, store, batch_size=int(ctx.settings.vlm.batch_size),
                    chunk_size=int(ctx.settings.activations.chunk_size),
                    device=ctx.device, run_chunks=run_chunks)


@dataclass
class ConceptImages:
    """The images of one concept: folder, table (file, status, seed, ...) and artifact key."""

    concept: str
    key: str
    path: Path
    table: pd.DataFrame

    @property
    def usable(self) -> pd.DataFrame:
        return self.table[self.table.status == "ok"]

    def files(self, usable: bool = True) -> list[Path]:
        rows = self.usable if usable else self.table
        return [self.path / f for f in rows.file]


def prompt_for(cfg: Config, concept: str) -> str:
    return run_context(cfg).settings.synthesis.prompt.format(concept=concept)


def concept_image_output(cfg: Config, concept: str, backend_id: str) -> StageOutput:
    return stage_output(STAGE, stage_params(cfg, STAGE),
                        inputs={"prompt": prompt_for(cfg, concept), "backend": backend_id})


def concept_image_key(cfg: Config, concept: str, backend_id: str) -> str:
    return concept_image_output(cfg, concept, backend_id).key


def concept_images(cfg: Config, concepts: list[str], synth=None, progress: bool = True,
                   force: bool = False, executor=None) -> tuple[dict[str, ConceptImages], dict]:
    """Images of every concept (cached per concept); returns ({concept: images}, counters).

    Each distinct concept is one unit of `executor`: the one given, the local one when `synth`
    is given (it runs here), else the config's (`run_context`); on Ray each worker loads the
    configured synthesizer once. Two units (or runs) wanting one concept build it once: the
    second waits for the first's artifact (the store's key lock). `force` makes every
    concept's images again (replacing the cached ones).
    """
    from ..executors import load_executor

    ctx = run_context(cfg)
    ex = executor or (load_executor("local") if synth is not None else ctx.executor)
    if ex.name == "local" and synth is None:
        synth = load_synthesizer_from_config(cfg)
    elif ex.name != "local" and ctx.settings.synthesis.name == "retrieve":
        # the pool's features, chunk by chunk on the workers, before any worker needs them
        from .activations import chunks_on_executor

        pool, _, pcfg = pool_config(cfg)
        cache_pool_features(cfg, pool=pool, pcfg=pcfg, run_chunks=chunks_on_executor(
            cfg_for_root(pcfg, pool), progress))
    unique = list(dict.fromkeys(concepts))
    done = ex.map(partial(images_of_concept, cfg, force=force), unique, desc="concept images",
                  progress=progress, local_kwargs={"synth": synth})
    store = ctx.store
    found = {}
    for concept, info in zip(unique, done):
        path = store.path(STAGE.name, info["key"])
        found[concept] = ConceptImages(concept, info["key"], path,
                                       pd.read_csv(path / "images.csv", keep_default_na=False))
    made = sum(info["built"] for info in done)
    stats = {"concepts": len(unique), "synthesised": made, "reused": len(unique) - made,
             "requested": len(concepts),
             "backend": done[0]["backend"] if done else getattr(synth, "backend_id", None),
             "pool_source": done[0]["pool_source"] if done else getattr(synth, "pool_source",
                                                                        None)}
    return found, stats


def images_of_concept(cfg: Config, concept: str, synth=None, force: bool = False) -> dict:
    """One unit of stage 05: the images of `concept` (cached); returns their key, whether this
    call built them, and the backend. Without `synth` (on a Ray worker) the configured one is
    loaded once per process."""
    from ..executors import worker_model

    synth = synth or worker_model("synthesizer", cfg, lambda: load_synthesizer_from_config(cfg))
    s = run_context(cfg).settings
    n, seed = int(s.synthesis.images_per_concept), int(s.seed)
    prompt = prompt_for(cfg, concept)
    built = False

    def build(tmp: Path) -> None:
        nonlocal built
        built = True
        rows = []
        for i, (im, status, info) in enumerate(synth.generate(prompt, list(range(seed, seed + n)))):
            atomic_write_bytes(tmp / f"{i:02d}.png", png_bytes(im.convert("RGB")))
            rows.append({"file": f"{i:02d}.png", "status": status, **info})
        atomic_write_text(tmp / "images.csv", pd.DataFrame(rows).to_csv(index=False))

    art = cached_stage(run_context(cfg).store,
                       concept_image_output(cfg, concept, synth.backend_id), build, force=force,
                       extra={"concept": concept})
    return {"key": art.key, "built": built, "backend": synth.backend_id,
            "pool_source": getattr(synth, "pool_source", None)}


def write_concept_image_index(results: "str | Path", images: "dict[str, ConceptImages]"
                              ) -> pd.DataFrame:
    """`05_concept_images.csv`: every concept image (file, status, seed or pool source, ...) with
    its concept and the first 12 characters of its artifact key; returns that table."""
    index = pd.concat([ci.table.assign(concept=c, key=ci.key[:12]) for c, ci in images.items()],
                      ignore_index=True)
    atomic_write_text(Path(results) / "05_concept_images.csv", index.to_csv(index=False))
    return index
