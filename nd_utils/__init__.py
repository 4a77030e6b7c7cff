"""nd_utils: describe what single neurons of vision networks detect (CLIP-Dissect, DnD).

The package backs the numbered notebooks in `notebooks/`; each stage is one call here. The
top-level names (`__all__`, about 45: the verbs the notebooks call, their plots and the two
base errors) are the public surface; everything else lives in its submodule and is imported
from there (`from nd_utils.stages.clip_dissect import label_key`).

Imports are lazy (PEP 562): `import nd_utils` loads no heavy library, and a name loads its
submodule on first use, so `import nd_utils.similarity` or `nd_utils.load_config` does not pull
in pandas, matplotlib or torchvision. The names moved out of the top level in 0.1 no longer
resolve here (0.2.0): import them from their submodule.

Example:
    >>> import nd_utils as nd
    >>> cfg = nd.load_config("offline")
    >>> cfg.settings.target.name
    'efficientnet-lite0'
"""
from __future__ import annotations

import importlib

from .machine import keep_freed_memory

keep_freed_memory()  # before any large tensor: see its docstring for the measured effect

__version__ = "0.2.0"

# public name -> submodule that defines it
_PUBLIC = {
    # configuration and runs
    "load_config": "context", "list_profiles": "config", "open_run": "runs",
    "run_pipeline": "pipeline", "list_executors": "executors", "load_executor": "executors",
    # inputs and models
    "load_probe": "probes", "list_probes": "probes", "load_probe_from_config": "stages.activations",
    "load_target": "backends.targets", "list_targets": "backends.targets",
    "from_module": "backends.target_network", "load_vlm": "backends.vlm", "list_vlms": "backends.vlm",
    "load_concept_set": "concept_sets", "list_concept_sets": "concept_sets",
    "trace_images": "hooks",
    # 01 activations, 02 CLIP-Dissect
    "cache_activations": "stages.activations", "load_activations": "stages.activations",
    "activation_summary": "stages.activations", "dissect_layer": "stages.clip_dissect",
    "write_label_tables": "stages.clip_dissect", "trust_layers": "stages.label_trust",
    "layer_trust": "stages.label_trust", "write_trust_summary": "stages.label_trust",
    # 03-06 Describe-and-Dissect
    "dnd_top_images": "stages.dnd", "dnd_captions": "stages.dnd", "dnd_concepts": "stages.dnd", "dnd_synthesis": "stages.dnd",
    "dnd_selection": "stages.dnd", "write_top_image_tables": "stages.dnd",
    "write_concept_tables": "stages.candidate_concepts", "write_concept_image_index": "stages.synthesis",
    "write_dnd_tables": "stages.dnd", "dnd_vs_clip_dissect": "stages.dnd", "dnd_label_trust": "stages.label_trust",
    # 07 final-layer evaluation, 08 label quality (plots, report, explorer: nd_utils.viz)
    "evaluate_final_layer": "stages.evaluation", "published_table": "stages.evaluation",
    "write_evaluation_tables": "stages.evaluation", "evaluate_label_quality": "stages.label_quality",
    "write_quality_tables": "stages.label_quality",
    # reproducibility and errors
    "seed_everything": "machine", "resolve_device": "machine", "NdUtilsError": "errors",
    "ConfigError": "errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        try:  # a submodule, e.g. nd.evaluation before anything imported it
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module 'nd_utils' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
