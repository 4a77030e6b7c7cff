"""The pipeline's stages, one module each: what it reads, its upstream, its tables, its code.

Each module of this package declares, at its top, the cache records of its stage
(`register_stage(Stage(name, notebook, version, reads, upstream))`, see `nd_utils.stage_cache`),
the result tables it writes (`TABLES`, `stage_cache.Table`: file name, columns readers rely on)
and, when the runner must know it before running, `asks_language_model(cfg, stages)`.
`load_stages()` imports every module found here, so the runner, the report and the run reader
read those declarations; a new stage is its module, its notebook and its YAML section (with its
`config_schema` model), and nothing else lists it.

Example:
    >>> get_stage("02").name
    '02_clip_dissect'
    >>> [t.path("results", "fc").name for t in list_tables()][:2]
    ['02_clip_dissect_fc.csv', '02_trust_summary.csv']
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..errors import unknown_name
from ..stage_cache import STAGES, Stage, Table


def stage_modules() -> list[ModuleType]:
    """Every stage module of this package, imported (sorted by name)."""
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)]


def load_stages() -> dict[str, Stage]:
    """{name: Stage} of every stage, in notebook order."""
    stage_modules()
    return dict(sorted(STAGES.items(), key=lambda kv: (kv[1].notebook, kv[0])))


def get_stage(name: str) -> Stage:
    """Look a stage up by full name (`01_activation_caching`) or number (`01`)."""
    stages = load_stages()
    if name in stages:
        return stages[name]
    for stage in stages.values():
        if stage.number == name:
            return stage
    raise unknown_name("stage", name, list(stages))


def list_tables() -> list[Table]:
    """The result tables every stage declares (`TABLES`), in notebook order."""
    found = [t for module in stage_modules() for t in getattr(module, "TABLES", ())]
    return sorted(found, key=lambda t: t.notebooks)  # stable: declaration order within one


def language_model_stages(cfg, stages) -> dict[str, str]:
    """The stages among `stages` (numbers) that would ask the language model, each with why.

    Each stage module that may ask declares `asks_language_model(cfg, stages) -> reason | None`
    beside its `STAGE`.
    """
    stages = set(stages)
    calling = {}
    for module in stage_modules():
        ask = getattr(module, "asks_language_model", None)
        number = module.STAGE.number if ask is not None else ""
        if ask is not None and number in stages:
            why = ask(cfg, stages)
            if why:
                calling[number] = why
    return dict(sorted(calling.items()))
