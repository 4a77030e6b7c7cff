"""Concept-image backends of stage 05 (DnD step 3): a registry (the stage is `nd_utils.synthesis`).

Registry names (`list_synthesizers`, `load_synthesizer`, `register_synthesizer`):

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

Example:
    >>> synth = load_synthesizer("diffusers", model="stabilityai/sd-turbo")   # doctest: +SKIP
    >>> image, status, info = synth.generate("a red car", seeds=[0])[0]      # doctest: +SKIP
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
from PIL import Image

from ..config import Config
from ..errors import NdUtilsError, OfflineError
from ..probes import ProbeSet
from ..machine import resolve_device
from ..registry import Registry

BLANK_STD = 2.0        # pixel std (0-255) below which an image counts as blank
RETRIEVE_MAX_SIDE = 512
_LOAD_LOCK = threading.Lock()  # threads of one process that share a synthesizer load it once


def image_status(image: Image.Image, nsfw: bool = False) -> str:
    """`ok`, `nsfw` (the pipeline's safety checker fired) or `blank` (near-constant pixels)."""
    if nsfw:
        return "nsfw"
    return "blank" if float(np.asarray(image.convert("L"), dtype=np.float32).std()) < BLANK_STD \
        else "ok"


class DiffusersSynthesizer:
    """Text-to-image through a diffusers pipeline (see the module docstring).

    Constructing one loads nothing: `backend_id` (the cache keys' name of the backend) comes
    from the arguments alone, and the pipeline is loaded on first use (`pipe`, `generate`), so
    stages that only look cached concept images up (06, 08) never load Stable Diffusion.
    """

    name = "diffusers"

    def __init__(self, model: str, device="cpu", steps: int = 50, scheduler: str = "dpm-multistep",
                 guidance_scale: float = 7.5, height: "int | None" = None,
                 width: "int | None" = None, batch_size: int = 10,
                 dtype: "torch.dtype | None" = None):
        if not model:
            raise NdUtilsError("synthesis.model is empty: name a diffusers pipeline, e.g. "
                               "CompVis/stable-diffusion-v1-4")
        if scheduler not in ("dpm-multistep", "default"):
            raise NdUtilsError(f"synthesis.scheduler must be dpm-multistep or default, got "
                               f"{scheduler!r}")
        self.model, self.scheduler = model, scheduler
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.steps, self.guidance_scale = int(steps), float(guidance_scale)
        self.height, self.width, self.batch_size = height, width, int(batch_size)
        self.dtype = dtype
        self._pipe = None
        self.backend_id = diffusers_backend_id(model, scheduler, dtype)

    @property
    def pipe(self):
        """The diffusers pipeline, loaded (onto `device`, in `dtype`) on first access."""
        if self._pipe is None:
            with _LOAD_LOCK:
                if self._pipe is None:
                    self._pipe = self._load()
        return self._pipe

    @pipe.setter
    def pipe(self, value) -> None:
        self._pipe = value

    def _load(self):
        from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

        dtype = self.dtype
        try:
            # `torch_dtype` is the name every diffusers version from our minimum (0.30) on
            # honours; 0.30-0.39 ignore `dtype`, and 0.40+ take `dtype` but still accept
            # `torch_dtype` (deprecated, with a FutureWarning that is ours to act on, not the
            # user's: hidden).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*",
                                        category=FutureWarning)
                pipe = DiffusionPipeline.from_pretrained(self.model, torch_dtype=dtype)
        except OSError as err:
            raise OfflineError(
                f"could not load diffusers pipeline {self.model!r} ({type(err).__name__}): it "
                f"needs the hub or a local folder. Offline, use synthesis.name: retrieve "
                f"(configs/offline.yaml)") from err
        if self.scheduler == "dpm-multistep":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.to(self.device)
        if pipe.dtype != dtype:  # a diffusers release that ignored the dtype argument
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

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


def diffusers_backend_id(model: str, scheduler: str = "dpm-multistep",
                         dtype: "torch.dtype | None" = None, device="cpu") -> str:
    """The `backend_id` a `DiffusersSynthesizer` of these settings has, computed without
    loading anything (`dtype` None: float16 on CUDA, else float32, as the synthesizer picks).

    >>> diffusers_backend_id("CompVis/stable-diffusion-v1-4")
    'diffusers:CompVis/stable-diffusion-v1-4:dpm-multistep:torch.float32:cpu-seeds'
    """
    if dtype is None:
        dtype = torch.float16 if resolve_device(device).type == "cuda" else torch.float32
    # cpu-seeds: the initial noise comes from CPU generators (images made before came from
    # generators on the pipeline's device, which differ on CUDA)
    return f"diffusers:{model}:{scheduler}:{dtype}:cpu-seeds"


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


SYNTHESIZERS = Registry("synthesizer")
SYNTHESIZERS.register("diffusers", DiffusersSynthesizer)
SYNTHESIZERS.register("retrieve", RetrieveSynthesizer)
register_synthesizer = SYNTHESIZERS.register


def list_synthesizers() -> list[str]:
    """Registry names: `['diffusers', 'retrieve']` (and any added with `register_synthesizer`)."""
    return SYNTHESIZERS.names()


def load_synthesizer(name: str, **kwargs):
    """A synthesizer by registry name; kwargs go to its class (see `load_synthesizer_from_config`
    in `nd_utils.synthesis` for what the config gives each)."""
    return SYNTHESIZERS.load(name, **kwargs)
