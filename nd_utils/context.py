"""A run's context: the checked config, its typed settings, the store, the executor and the device.

`load_config` is the one way in: it reads a profile (`config.read_config`), imports the modules
`plugins:` names (so what they register is usable by name), checks every value and every name
against the registries, and resolves `target.name` to the weights it means. `run_context(cfg)`
then builds, once per config object, what stage code receives instead of rebuilding it from the
config in each function: `settings` (attributes, not dotted strings), the `ArtifactStore`, the
executor and the torch device.

Example:
    >>> cfg = load_config("offline")
    >>> ctx = run_context(cfg)
    >>> ctx.settings.target.name, run_context(cfg) is ctx
    ('efficientnet-lite0', True)
"""
from __future__ import annotations

import inspect
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import Config, import_configured_plugins, read_config
from .config_values import BACKEND_SECTIONS
from .config_schema import Schema, validate_config
from .executors import executor_from_config, list_executors
from .machine import resolve_device
from .store import ArtifactStore

# keyword arguments every similarity function takes from the stage, not from hyperparameters
_STAGE_KEYWORDS = ("layer", "device", "chunk_size", "num_workers")


def registered_names() -> dict:
    """{family: names} of every registry a config chooses from (see config_values.one_of), and
    `<family>_parameters` of each backend family ({backend name: (the settings its loader takes,
    whether it takes **kwargs)}, read from its loader's signature on first lookup)."""
    from .backends.captioners import list_captioners
    from .backends.language_models import list_language_models
    from .backends.prompt_templates import list_templates
    from .backends.synthesizers import list_synthesizers
    from .backends.families import FAMILIES, LazyParameters
    from .probes import list_probes
    from .scoring import list_scorings
    from .similarity import get_similarity, list_similarities

    similarities = list_similarities()
    keywords = {}
    for name in similarities:
        params = inspect.signature(get_similarity(name)).parameters.values()
        keywords[name] = [p.name for p in params
                          if p.kind == p.KEYWORD_ONLY and p.name not in _STAGE_KEYWORDS]
    return {
        "similarity": similarities,
        "scoring": list_scorings(),
        "captioner": list_captioners(),
        "language_model": list_language_models(),
        "synthesizer": list_synthesizers(),
        "probe_set": list_probes(),
        "executor": list_executors(),
        "prompt_version": list_templates(),
        "similarity_keywords": keywords,
        **{f"{BACKEND_SECTIONS[f.section]}_parameters": LazyParameters(f)
           for f in FAMILIES.values()},
    }


def load_config(
    config: "str | Path | Mapping | Config" = "offline",
    overrides: "Iterable[str] | Mapping[str, Any] | None" = None,
) -> Config:
    """Load a profile by name, a YAML path, a mapping or a Config, then apply overrides.

    Every value is checked (one ConfigError lists each problem); `plugins:` are imported first so
    the names they register validate. The returned config has `data_dir` made absolute so that a
    saved copy of it (the effective config of a run) points at the same artifact store.
    """
    cfg = read_config(config, overrides)
    # before validating: the names a plugin registers (target.name, captioner.name) are valid
    # only once it has run; a malformed list is left to validate_config's error listing
    data = cfg.to_dict()
    import_configured_plugins(data)
    validate_config(data, cfg.source, names=registered_names())
    cfg.set("data_dir", str(cfg.data_dir))
    cfg.set("target.name", resolve_target_name(cfg["target.name"]))
    return cfg


def resolve_target_name(name: str) -> str:
    """`target.name` as the name of the weights it means, so that cache keys name them.

    A bare torchvision architecture (`resnet50`) or `<arch>:DEFAULT` becomes its DEFAULT weights'
    name (`resnet50:IMAGENET1K_V2` with torchvision 0.29); every other name is kept. torchvision
    is imported only for names that may need it.

    >>> resolve_target_name("efficientnet-lite0")
    'efficientnet-lite0'
    """
    name = str(name)
    tag = name.partition(":")[2]
    if name.startswith(("efficientnet-lite", "timm:")) or (tag and tag.upper() != "DEFAULT"
                                                           and tag.lower() != "none"):
        return name
    from .backends.targets import canonical_target_name  # torchvision's weight enums

    return canonical_target_name(name)


class RunContext:
    """What the stages of one config share, each part built on first use.

    `cfg` (for cache keys: `cfg.select(stage.reads)`), `settings` (typed), `store`, `executor`
    and `device`. Models are loaded where a stage needs them, by `nd_utils.backends.configured`
    (one `*_from_config` per family, reading these settings), and not kept here: a context lives
    as long as its config, and holding every model of a run would hold their memory too.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def settings(self) -> Schema:
        return self.cfg.settings

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.cfg.data_dir)

    @cached_property
    def executor(self):
        return executor_from_config(self.cfg)

    @cached_property
    def device(self):
        return resolve_device(self.settings.device)

    def __repr__(self) -> str:
        return f"RunContext({self.cfg!r}, store={self.cfg.data_dir})"


def run_context(cfg: "Config | RunContext") -> RunContext:
    """The context of `cfg`, built once per config object (a context is returned as it is)."""
    if isinstance(cfg, RunContext):
        return cfg
    ctx = cfg.__dict__.get("_context")
    if ctx is None:
        ctx = cfg.__dict__["_context"] = RunContext(cfg)
    return ctx
