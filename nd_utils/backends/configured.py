"""Backends as a config names them: the `*_from_config` adapters of every family.

Stage modules build their models here, so no stage imports another stage to get a model. Each
adapter passes what its schema keys say and, besides, the extra keys of its section that the
chosen backend's loader takes (`Family.extra_settings`: a registered backend's own settings;
none in the shipped profiles, so built-in backends get what they always got).

Example:
    >>> cfg = load_config("offline")                                    # doctest: +SKIP
    >>> load_vlm_from_config(cfg).backend_id                            # doctest: +SKIP
    'conse:T=10:efficientnet-lite2:...'
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from .families import FAMILIES
from ..machine import resolve_device
from .captioners import Captioner, captioner_settings, load_captioner
from .answer_cache import CachedLanguageModel
from .language_models import load_language_model
from .target_network import Target
from .targets import load_target
from .vlm import VisionLanguageModel, load_vlm


def _device(cfg: Config):
    return resolve_device(cfg.settings.device)


def load_target_from_config(cfg: Config, device=None) -> Target:
    """The network `target.name` on the configured device (or `device`); `seed` draws `:none`;
    a registered target gets the extra keys of `target:` it takes."""
    s = cfg.settings
    return load_target(s.target.name, seed=int(s.seed),
                       **FAMILIES["target"].extra_settings(s.target)).to(
        resolve_device(device) if device is not None else _device(cfg))


def load_vlm_from_config(cfg: Config) -> VisionLanguageModel:
    """The vision-language model named by `vlm.name`, on the configured device, computing in
    `vlm.dtype` (float32 when the config has none; only a backend that supports another dtype
    is given one, so a registered backend without a `dtype` argument still loads), with the
    extra keys of `vlm:` it takes."""
    dtype = vlm_dtype(cfg)
    section = cfg.settings.vlm
    return load_vlm(section.name, device=_device(cfg),
                    **({} if dtype == "float32" else {"dtype": dtype}),
                    **FAMILIES["vlm"].extra_settings(section))


def vlm_dtype(cfg: Config) -> str:
    """`vlm.dtype` (`float32`, `float16` or `bfloat16`); `float32` when the config has none."""
    return str(cfg.settings.vlm.dtype or "float32")


def load_captioner_from_config(cfg: Config) -> Captioner:
    """The captioner of `captioner.*` on the configured device, given the keys of its section
    that its loader takes (`captioner_settings`: blip's model, checkpoint and max_new_tokens; a
    registered captioner's own keys); None values are left to the loader's defaults."""
    section = cfg.settings.captioner
    return load_captioner(section.name, device=_device(cfg), **captioner_settings(
        section.name, section.model_dump(exclude_unset=True)))


def language_model_from_config(cfg: Config, backend=None) -> CachedLanguageModel:
    """The `llm.*` backend behind the answer cache at `<data_dir>/cache/llm_answers.jsonl`; a
    backend gets the extra keys of `llm:` it takes."""
    llm = cfg.settings.llm
    extra = {"require_key": llm.mode != "replay"} if llm.name == "openai" else {}
    backend = backend or load_language_model(
        llm.name, model=llm.model, max_new_tokens=int(llm.max_new_tokens),
        device=_device(cfg) if llm.name == "transformers" else "cpu", **extra,
        **FAMILIES["llm"].extra_settings(llm))
    return CachedLanguageModel(backend, Path(cfg.data_dir) / "cache" / "llm_answers.jsonl",
                               temperature=float(llm.temperature), mode=llm.mode)
