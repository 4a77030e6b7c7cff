"""nd_utils: describe what single neurons of vision networks detect (CLIP-Dissect, DnD).

The package backs the numbered notebooks in `notebooks/`; each stage is one call here. The
top-level names (`__all__`, about 45: the verbs the notebooks call, their plots and the two
base errors) are the public surface; everything else lives in its submodule and is imported
from there (`from nd_utils.clip_dissect import label_key`).

Imports are lazy (PEP 562): `import nd_utils` loads no heavy library, and a name loads its
submodule on first use, so `import nd_utils.similarity` or `nd_utils.load_config` does not pull
in pandas, matplotlib or torchvision. Names that were top-level before still resolve, with a
DeprecationWarning naming their submodule.

Example:
    >>> import nd_utils as nd
    >>> cfg = nd.load_config("offline")
    >>> cfg["target.name"]
    'efficientnet-lite0'
"""
from __future__ import annotations

import importlib
import warnings

from .machine import keep_freed_memory

keep_freed_memory()  # before any large tensor: see its docstring for the measured effect

__version__ = "0.1.0"

# public name -> submodule that defines it
_PUBLIC = {
    # configuration and runs
    "load_config": "config", "list_profiles": "config", "open_run": "pipeline",
    "run_pipeline": "pipeline", "list_executors": "executors", "load_executor": "executors",
    # inputs and models
    "load_probe": "probes", "list_probes": "probes", "load_probe_from_config": "activations",
    "load_target": "backends.targets", "list_targets": "backends.targets",
    "from_module": "backends.targets", "load_vlm": "backends.vlm", "list_vlms": "backends.vlm",
    "load_concept_set": "concept_sets", "list_concept_sets": "concept_sets",
    "trace_images": "hooks",
    # 01 activations, 02 CLIP-Dissect
    "cache_activations": "activations", "load_activations": "activations",
    "activation_summary": "activations", "dissect_layer": "clip_dissect",
    "write_label_tables": "clip_dissect", "trust_layers": "label_trust",
    "layer_trust": "label_trust", "write_trust_summary": "label_trust",
    # 03-06 Describe-and-Dissect
    "dnd_top_images": "dnd", "dnd_captions": "dnd", "dnd_concepts": "dnd", "dnd_synthesis": "dnd",
    "dnd_selection": "dnd", "write_top_image_tables": "dnd",
    "write_concept_tables": "candidate_concepts", "write_concept_image_index": "synthesis",
    "write_dnd_tables": "dnd", "dnd_vs_clip_dissect": "dnd", "dnd_label_trust": "label_trust",
    # 07 final-layer evaluation, 08 label quality (plots, report, explorer: nd_utils.viz)
    "evaluate_final_layer": "evaluation", "published_table": "evaluation",
    "write_evaluation_tables": "evaluation", "evaluate_label_quality": "label_quality",
    "write_quality_tables": "label_quality",
    # reproducibility and errors
    "seed_everything": "machine", "resolve_device": "machine", "NdUtilsError": "errors",
    "ConfigError": "errors",
}

# formerly top-level names -> submodule (they still resolve, with a DeprecationWarning)
_MOVED = {
    "most_selective_neurons": "viz.activation_plots",
    "plot_activation_distributions": "viz.activation_plots",
    "plot_top_images": "viz.activation_plots", "plot_neuron_labels": "viz.label_plots",
    "plot_evaluation": "viz.label_plots", "plot_top_items": "viz.dnd_plots",
    "plot_crop_boxes": "viz.dnd_plots", "plot_dnd_neuron": "viz.dnd_plots",
    "plot_concept_images": "viz.dnd_plots", "plot_label_quality": "viz.quality_plots",
    "write_report": "viz.report", "write_figures": "viz.figures", "NeuronExplorer": "viz.explorer",
    "Artifact": "store", "ArtifactStore": "store", "CacheJob": "decode_once",
    "CachedLanguageModel": "backends.language_models", "Captioner": "backends.captioners",
    "ConceptSet": "concept_sets", "Config": "config", "DamagedArtifactError": "errors",
    "ExplorerView": "viz.explorer", "FiguresResult": "viz.figures", "ImageTrace": "hooks",
    "JsonlCache": "jsonl_cache", "LayerActivations": "activations",
    "MissingArtifactError": "errors", "OfflineError": "errors", "ProbeError": "errors",
    "ProbeSet": "probes", "QualityResult": "label_quality",
    "ReplayMissError": "backends.language_models", "Run": "pipeline", "RunView": "viz.run_folders",
    "SCORINGS": "selection", "SIMILARITY_FUNCTIONS": "similarity", "STAGES": "stages",
    "StageFailed": "pipeline", "Target": "backends.targets", "TargetConsumer": "activations",
    "TopImages": "top_images", "TraceLayers": "hooks", "UnknownNameError": "errors",
    "VisionLanguageModel": "backends.vlm", "activation_key": "activations",
    "build_top_images": "top_images", "cache_captions": "captions",
    "cache_text_features": "clip_dissect", "choose_neurons": "top_images",
    "clean_candidates": "candidate_concepts", "clean_concept": "candidate_concepts",
    "concept_images": "synthesis", "concept_similarity": "clip_dissect", "count_hooks": "hooks",
    "dnd_layers": "dnd", "evaluation_config": "evaluation",
    "generate_concepts": "candidate_concepts", "get_similarity": "similarity",
    "get_stage": "stages", "image_feature_job": "image_features",
    "image_feature_jobs_if_missing": "image_features", "label_table": "clip_dissect",
    "language_model_from_config": "backends.configured", "list_captioners": "backends.captioners",
    "list_language_models": "backends.language_models", "list_notebooks": "pipeline",
    "list_runs": "viz.explorer", "list_similarities": "similarity",
    "list_synthesizers": "backends.synthesizers", "load_captioner": "backends.captioners",
    "load_captioner_from_config": "backends.configured",
    "load_concepts_from_config": "clip_dissect", "load_image_features": "image_features",
    "load_language_model": "backends.language_models", "load_probes": "probes",
    "load_synthesizer_from_config": "synthesis", "load_template": "backends.language_models",
    "load_vlm_from_config": "backends.configured", "open_run_folder": "viz.run_folders",
    "parse_answer": "candidate_concepts", "parse_concept_text": "concept_sets",
    "parse_overrides": "config", "propose_concepts": "candidate_concepts",
    "quality_config": "label_quality", "quality_parts": "label_quality", "rank_by": "selection",
    "run_decode_once": "decode_once", "score_candidates": "selection", "trace_batch": "hooks",
}

# formerly top-level names that were also renamed -> (submodule, new name)
_RENAMED = {"pool": ("hooks", "apply_pooling")}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _RENAMED:
        module, new = _RENAMED[name]
        warnings.warn(f"nd_utils.{name} is now nd_utils.{module}.{new}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(f".{module}", __name__), new)
    module = _PUBLIC.get(name) or _MOVED.get(name)
    if module is None:
        try:  # a submodule, e.g. nd.evaluation before anything imported it
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module 'nd_utils' has no attribute {name!r}") from None
    if name in _MOVED:
        warnings.warn(f"nd_utils.{name} moved out of the top level: import it from "
                      f"nd_utils.{module}", DeprecationWarning, stacklevel=2)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if name in _PUBLIC:
        globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
