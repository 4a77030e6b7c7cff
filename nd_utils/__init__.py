"""nd_utils: describe what single neurons of vision networks detect (CLIP-Dissect, DnD).

The package backs the numbered notebooks in `notebooks/`; each stage is one call here.
"""
from .runtime import keep_freed_memory

keep_freed_memory()  # before any large tensor: see its docstring for the measured effect

from .activation_plots import (most_selective_neurons, plot_activation_distributions,
                               plot_top_images)
from .activations import (LayerActivations, TargetConsumer, activation_key, activation_summary,
                          cache_activations, load_activations, load_probe_from_config)
from .captioners import (Captioner, cache_captions, list_captioners, load_captioner,
                         load_captioner_from_config)
from .clip_dissect import (cache_text_features, concept_similarity, dissect_layer,
                           image_feature_job, image_feature_jobs_if_missing, label_table,
                           load_concepts_from_config, load_image_features, load_vlm_from_config,
                           write_label_tables)
from .concept_generation import (clean_candidates, clean_concept, generate_concepts,
                                 language_model_from_config, parse_answer, propose_concepts)
from .concepts import ConceptSet, list_concept_sets, load_concept_set, parse_concept_text
from .config import Config, list_profiles, load_config, parse_overrides
from .decode_once import CacheJob, run_decode_once
from .dnd import (dnd_captions, dnd_concepts, dnd_layers, dnd_selection, dnd_synthesis,
                  dnd_top_images, write_dnd_tables, write_top_image_tables)
from .dnd_plots import plot_crop_boxes, plot_dnd_neuron, plot_top_items
from .errors import (ConfigError, DamagedArtifactError, MissingArtifactError, NdUtilsError,
                     OfflineError, ProbeError, UnknownNameError)
from .evaluation import evaluate_final_layer, evaluation_config, published_table
from .hooks import ImageTrace, TraceLayers, count_hooks, pool, trace_batch, trace_images
from .jsonl_cache import JsonlCache
from .label_plots import plot_evaluation, plot_neuron_labels
from .label_quality import (QualityResult, evaluate_label_quality, quality_config, quality_parts,
                            write_quality_tables)
from .quality_plots import plot_label_quality
from .language_models import (CachedLanguageModel, ReplayMissError, list_language_models,
                              load_language_model, load_template)
from .explorer import ExplorerView, NeuronExplorer, list_runs
from .figures import FiguresResult, write_figures
from .report import write_report
from .run_reader import RunView, open_run_folder
from .probes import ProbeSet, list_probes, load_probe, load_probes
from .runner import Run, StageFailed, list_notebooks, open_run, run_pipeline
from .runtime import resolve_device, seed_everything
from .selection import SCORINGS, rank_by, score_candidates
from .similarity import SIMILARITY_FUNCTIONS, get_similarity, list_similarities
from .stages import STAGES, get_stage
from .store import Artifact, ArtifactStore
from .synthesis import (concept_images, list_synthesizers, load_synthesizer_from_config)
from .targets import Target, from_module, list_targets, load_target
from .top_images import TopImages, build_top_images, choose_neurons
from .vlm import VisionLanguageModel, list_vlms, load_vlm

__version__ = "0.1.0"

__all__ = [
    "Artifact", "ArtifactStore", "CacheJob", "ConceptSet", "Config", "ConfigError",
    "DamagedArtifactError",
    "LayerActivations", "MissingArtifactError", "NdUtilsError", "OfflineError", "ProbeError",
    "ProbeSet", "Run", "SIMILARITY_FUNCTIONS", "STAGES", "StageFailed", "Target",
    "ImageTrace", "TargetConsumer", "TraceLayers", "UnknownNameError", "VisionLanguageModel",
    "activation_key", "activation_summary", "cache_activations", "cache_text_features",
    "concept_similarity", "count_hooks", "dissect_layer", "evaluate_final_layer",
    "evaluation_config", "from_module", "get_similarity", "get_stage", "image_feature_job",
    "image_feature_jobs_if_missing", "label_table", "list_concept_sets", "list_notebooks",
    "list_probes", "list_profiles", "list_similarities", "list_targets", "list_vlms",
    "load_activations", "load_concept_set", "load_concepts_from_config", "load_config",
    "load_image_features", "load_probe", "load_probe_from_config", "load_probes", "load_target",
    "load_vlm", "load_vlm_from_config", "most_selective_neurons", "open_run",
    "parse_concept_text", "parse_overrides", "plot_activation_distributions", "plot_evaluation",
    "plot_neuron_labels", "plot_top_images", "pool", "published_table", "trace_batch", "trace_images", "resolve_device",
    "run_decode_once", "run_pipeline", "seed_everything", "write_label_tables",
    # Describe-and-Dissect
    "CachedLanguageModel", "Captioner", "JsonlCache", "ReplayMissError", "SCORINGS", "TopImages",
    "build_top_images", "cache_captions", "choose_neurons", "clean_candidates", "clean_concept",
    "concept_images", "dnd_captions", "dnd_concepts", "dnd_layers", "dnd_selection",
    "dnd_synthesis", "dnd_top_images", "generate_concepts", "language_model_from_config",
    "list_captioners", "list_language_models", "list_synthesizers", "load_captioner",
    "load_captioner_from_config", "load_language_model", "load_synthesizer_from_config",
    "load_template", "parse_answer", "plot_crop_boxes", "plot_dnd_neuron", "plot_top_items",
    "propose_concepts", "rank_by", "score_candidates", "write_dnd_tables",
    "write_top_image_tables",
    # label quality (08)
    "QualityResult", "evaluate_label_quality", "plot_label_quality", "quality_config",
    "quality_parts", "write_quality_tables",
    # exploring runs
    "ExplorerView", "FiguresResult", "NeuronExplorer", "RunView", "list_runs", "open_run_folder",
    "write_figures", "write_report",
]
