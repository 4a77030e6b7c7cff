"""Stage 05: images of each candidate concept (DnD step 3), cached per concept across neurons.

Registry names (`list_synthesizers`, `load_synthesizer`):

* `diffusers`: any text-to-image pipeline id or folder (the paper: Stable Diffusion,
  DPM-Solver multistep, 50 steps), fp16 on CUDA, full resolution, batched, with one seeded CPU
  generator per image (image i of a concept uses `torch.Generator("cpu").manual_seed(seed + i)`,
  as the diffusers reproducibility guide recommends), so an image depends neither on call
  order, batch size nor the GPU's random number generator. Blank and NSFW-filtered images are
  recorded and excluded.
* `retrieve`: the offline default. The `images_per_concept` images of a reference pool (an image
  folder or probe-set spec, never the probe images themselves when avoidable) whose
  vision-language embeddings are most similar to the prompt's. Real photos, no generation:
  a stand-in that can only find what the pool contains.

One artifact per (backend, model, prompt, settings, seed): a concept proposed for ten neurons, or
in ten runs, is synthesised once.

Example:
    >>> synth = load_synthesizer_from_config(cfg)                      # doctest: +SKIP
    >>> images = concept_images(cfg, ["red-themed scenes"], synth)     # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .activations import cfg_for_root, load_probe_from_config
from .clip_dissect import image_feature_jobs_if_missing, load_image_features, load_vlm_from_config
from .config import Config
from .decode_once import run_decode_once
from .errors import NdUtilsError, OfflineError, ProbeError, unknown_name
from .probes import ProbeSet, load_probes
from .runtime import resolve_device
from .stages import STAGES, StageOutput, cached_stage, stage_output
from .store import ArtifactStore, atomic_write_bytes, atomic_write_text
from .top_images import png_bytes

STAGE = STAGES["05_concept_images"]
BLANK_STD = 2.0        # pixel std (0-255) below which an image counts as blank
RETRIEVE_MAX_SIDE = 512


def image_status(image: Image.Image, nsfw: bool = False) -> str:
    """`ok`, `nsfw` (the pipeline's safety checker fired) or `blank` (near-constant pixels)."""
    if nsfw:
        return "nsfw"
    return "blank" if float(np.asarray(image.convert("L"), dtype=np.float32).std()) < BLANK_STD \
        else "ok"


class DiffusersSynthesizer:
    """Text-to-image through a diffusers pipeline (see the module docstring)."""

    name = "diffusers"

    def __init__(self, model: str, device="cpu", steps: int = 50, scheduler: str = "dpm-multistep",
                 guidance_scale: float = 7.5, height: "int | None" = None,
                 width: "int | None" = None, batch_size: int = 10,
                 dtype: "torch.dtype | None" = None):
        from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

        if not model:
            raise NdUtilsError("synthesis.model is empty: name a diffusers pipeline, e.g. "
                               "CompVis/stable-diffusion-v1-4")
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            # `torch_dtype` is the name every diffusers version from our minimum (0.30) on
            # honours; 0.30-0.39 ignore `dtype`, and 0.40+ take `dtype` but still accept
            # `torch_dtype` (deprecated, with a FutureWarning that is ours to act on, not the
            # user's: hidden).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*",
                                        category=FutureWarning)
                self.pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except OSError as err:
            raise OfflineError(
                f"could not load diffusers pipeline {model!r} ({type(err).__name__}): it needs the "
                f"hub or a local folder. Offline, use synthesis.name: retrieve "
                f"(configs/offline.yaml)") from err
        if scheduler == "dpm-multistep":
            self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        elif scheduler != "default":
            raise NdUtilsError(f"synthesis.scheduler must be dpm-multistep or default, got "
                               f"{scheduler!r}")
        self.pipe.to(self.device)
        if self.pipe.dtype != dtype:  # a diffusers release that ignored the dtype argument
            self.pipe.to(dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance_scale = int(steps), float(guidance_scale)
        self.height, self.width, self.batch_size = height, width, int(batch_size)
        self.dtype = dtype
        # cpu-seeds: the initial noise comes from CPU generators (images made before came from
        # generators on the pipeline's device, which differ on CUDA)
        self.backend_id = f"diffusers:{model}:{scheduler}:{dtype}:cpu-seeds"

    def generate(self, prompt: str, seeds: list[int]) -> list[tuple[Image.Image, str, dict]]:
        """One image per seed: (image, status, info)."""
        out = []
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start:start + self.batch_size]
            # one CPU generator per image: the same noise on any device, in any batch
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk]
            res = self.pipe(prompt=[prompt] * len(chunk), generator=gens,
                            num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                            height=self.height, width=self.width)
            flags = getattr(res, "nsfw_content_detected", None) or [False] * len(chunk)
            out += [(im, image_status(im, bool(f)), {"seed": int(s)})
                    for im, f, s in zip(res.images, flags, chunk)]
        return out


class RetrieveSynthesizer:
    """Rank a reference image pool by the vision-language model's similarity to the prompt."""

    name = "retrieve"

    def __init__(self, cfg: Config, pool: ProbeSet, pool_features: torch.Tensor, vlm):
        self.cfg, self.pool, self.features, self.vlm = cfg, pool, pool_features, vlm
        self.backend_id = f"retrieve:{vlm.backend_id}:pool={pool.fingerprint[:16]}"

    def generate(self, prompt: str, seeds: list[int]) -> list[tuple[Image.Image, str, dict]]:
        text = self.vlm.encode_texts([prompt]).float().cpu()
        scores = (self.features.float() @ text.T)[:, 0]
        top = torch.topk(scores, min(len(seeds), len(scores))).indices
        out = []
        for i in top.tolist():
            im = self.pool.load_image(i)
            im.thumbnail((RETRIEVE_MAX_SIDE, RETRIEVE_MAX_SIDE), Image.BICUBIC)
            out.append((im, image_status(im), {"pool_index": i, "source": self.pool.items[i].path,
                                               "similarity": float(scores[i])}))
        return out


def list_synthesizers() -> list[str]:
    return ["diffusers", "retrieve"]


def load_pool(cfg: Config) -> tuple[ProbeSet, str]:
    """The retrieval pool `synthesis.pool`; falls back to the probe set (with a warning)."""
    try:
        return load_probes(cfg["synthesis.pool"]), "synthesis.pool"
    except ProbeError as exc:
        warnings.warn(f"retrieval pool unavailable ({exc}); retrieving from the probe set "
                      f"instead, so concept images can repeat probe images", stacklevel=2)
        return load_probe_from_config(cfg), "probe.sets (fallback)"


def load_synthesizer_from_config(cfg: Config, vlm=None):
    """The `synthesis.*` backend; `retrieve` also caches the pool's image features."""
    name = cfg["synthesis.name"]
    device = resolve_device(cfg.get("device", "auto"))
    if name == "diffusers":
        return DiffusersSynthesizer(cfg["synthesis.model"], device=device,
                                    steps=cfg["synthesis.steps"],
                                    scheduler=cfg["synthesis.scheduler"],
                                    guidance_scale=cfg["synthesis.guidance_scale"],
                                    height=cfg["synthesis.height"], width=cfg["synthesis.width"],
                                    batch_size=cfg["synthesis.batch_size"])
    if name == "retrieve":
        pool, source = load_pool(cfg)
        pcfg = cfg.with_overrides({"probe.sets": cfg["synthesis.pool"] if source ==
                                   "synthesis.pool" else cfg["probe.sets"], "probe.limit": None})
        vlm = vlm or load_vlm_from_config(cfg)
        # a split part of a pool reads the whole pool's features (computed once, shared with 07)
        jobs = image_feature_jobs_if_missing(cfg_for_root(pcfg, pool), pool.root, vlm)
        if jobs:
            run_decode_once(pool.root, jobs, ArtifactStore(cfg.data_dir),
                            batch_size=int(cfg["vlm.batch_size"]),
                            chunk_size=int(cfg["activations.chunk_size"]), device=device)
        synth = RetrieveSynthesizer(cfg, pool, load_image_features(pcfg, pool), vlm)
        synth.pool_source = source
        return synth
    raise unknown_name("synthesizer", name, list_synthesizers())


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
    return cfg["synthesis.prompt"].format(concept=concept)


def concept_image_output(cfg: Config, concept: str, backend_id: str) -> StageOutput:
    return stage_output(STAGE, cfg.select(STAGE.reads),
                        inputs={"prompt": prompt_for(cfg, concept), "backend": backend_id})


def concept_image_key(cfg: Config, concept: str, backend_id: str) -> str:
    return concept_image_output(cfg, concept, backend_id).key


def concept_images(cfg: Config, concepts: list[str], synth, progress: bool = True,
                   force: bool = False) -> tuple[dict[str, ConceptImages], dict]:
    """Images of every concept (cached per concept); returns ({concept: images}, counters).

    `force` makes every concept's images again (replacing the cached ones).
    """
    store = ArtifactStore(cfg.data_dir)
    n, seed = int(cfg["synthesis.images_per_concept"]), int(cfg["seed"])
    found, made = {}, 0
    unique = list(dict.fromkeys(concepts))
    for concept in tqdm(unique, desc="concept images", disable=not progress):
        prompt = prompt_for(cfg, concept)

        def build(tmp: Path) -> None:
            nonlocal made
            made += 1
            rows = []
            for i, (im, status, info) in enumerate(synth.generate(prompt, list(
                    range(seed, seed + n)))):
                atomic_write_bytes(tmp / f"{i:02d}.png", png_bytes(im.convert("RGB")))
                rows.append({"file": f"{i:02d}.png", "status": status, **info})
            atomic_write_text(tmp / "images.csv", pd.DataFrame(rows).to_csv(index=False))

        art = cached_stage(store, concept_image_output(cfg, concept, synth.backend_id), build,
                           force=force, extra={"concept": concept})
        found[concept] = ConceptImages(concept, art.key, art.path,
                                       pd.read_csv(art.file("images.csv"), keep_default_na=False))
    stats = {"concepts": len(unique), "synthesised": made, "reused": len(unique) - made,
             "requested": len(concepts)}
    return found, stats
