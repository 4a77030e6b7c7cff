"""nd_utils: describe what single neurons of vision networks detect (CLIP-Dissect, DnD).

The package backs the numbered notebooks in `notebooks/`; each stage is one call here.
"""
from .activation_plots import (most_selective_neurons, plot_activation_distributions,
                               plot_top_images)
from .activations import (LayerActivations, TargetConsumer, activation_key, activation_summary,
                          cache_activations, load_activations, load_probe_from_config)
from .clip_dissect import (cache_text_features, concept_similarity, dissect_layer,
                           image_feature_job, image_feature_jobs_if_missing, label_table,
                           load_concepts_from_config, load_image_features, load_vlm_from_config,
                           write_label_tables)
from .concepts import ConceptSet, list_concept_sets, load_concept_set, parse_concept_text
from .config import Config, list_profiles, load_config, parse_overrides
from .decode_once import CacheJob, run_decode_once
from .errors import (ConfigError, MissingArtifactError, NdUtilsError, OfflineError, ProbeError,
                     UnknownNameError)
from .evaluation import evaluate_final_layer, evaluation_config, published_table
from .hooks import TraceLayers, count_hooks, pool
from .label_plots import plot_evaluation, plot_neuron_labels
from .probes import ProbeSet, list_probes, load_probe, load_probes
from .runner import Run, StageFailed, list_notebooks, open_run, run_pipeline
from .runtime import resolve_device, seed_everything
from .similarity import SIMILARITY_FUNCTIONS, get_similarity, list_similarities
from .stages import STAGES, get_stage
from .store import Artifact, ArtifactStore
from .targets import Target, from_module, list_targets, load_target
from .vlm import VisionLanguageModel, list_vlms, load_vlm

__version__ = "0.1.0"

__all__ = [
    "Artifact", "ArtifactStore", "CacheJob", "ConceptSet", "Config", "ConfigError",
    "LayerActivations", "MissingArtifactError", "NdUtilsError", "OfflineError", "ProbeError",
    "ProbeSet", "Run", "SIMILARITY_FUNCTIONS", "STAGES", "StageFailed", "Target",
    "TargetConsumer", "TraceLayers", "UnknownNameError", "VisionLanguageModel",
    "activation_key", "activation_summary", "cache_activations", "cache_text_features",
    "concept_similarity", "count_hooks", "dissect_layer", "evaluate_final_layer",
    "evaluation_config", "from_module", "get_similarity", "get_stage", "image_feature_job",
    "image_feature_jobs_if_missing", "label_table", "list_concept_sets", "list_notebooks",
    "list_probes", "list_profiles", "list_similarities", "list_targets", "list_vlms",
    "load_activations", "load_concept_set", "load_concepts_from_config", "load_config",
    "load_image_features", "load_probe", "load_probe_from_config", "load_probes", "load_target",
    "load_vlm", "load_vlm_from_config", "most_selective_neurons", "open_run",
    "parse_concept_text", "parse_overrides", "plot_activation_distributions", "plot_evaluation",
    "plot_neuron_labels", "plot_top_images", "pool", "published_table", "resolve_device",
    "run_decode_once", "run_pipeline", "seed_everything", "write_label_tables",
]
