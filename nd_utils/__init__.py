"""nd_utils: describe what single neurons of vision networks detect (CLIP-Dissect, DnD).

The package backs the numbered notebooks in `notebooks/`; each stage is one call here.
"""
from .activation_plots import (most_selective_neurons, plot_activation_distributions,
                               plot_top_images)
from .activations import (LayerActivations, TargetConsumer, activation_key, activation_summary,
                          cache_activations, load_activations, load_probe_from_config)
from .config import Config, list_profiles, load_config, parse_overrides
from .decode_once import CacheJob, run_decode_once
from .errors import (ConfigError, MissingArtifactError, NdUtilsError, OfflineError, ProbeError,
                     UnknownNameError)
from .hooks import TraceLayers, count_hooks, pool
from .probes import ProbeSet, list_probes, load_probe, load_probes
from .runner import Run, StageFailed, list_notebooks, open_run, run_pipeline
from .runtime import resolve_device, seed_everything
from .stages import STAGES, get_stage
from .store import Artifact, ArtifactStore
from .targets import Target, from_module, list_targets, load_target

__version__ = "0.1.0"

__all__ = [
    "Artifact", "ArtifactStore", "CacheJob", "Config", "ConfigError", "LayerActivations",
    "MissingArtifactError", "NdUtilsError", "OfflineError", "ProbeError", "ProbeSet", "Run",
    "STAGES", "StageFailed", "Target", "TargetConsumer", "TraceLayers", "UnknownNameError",
    "activation_key", "activation_summary", "cache_activations", "count_hooks", "from_module", "get_stage",
    "list_notebooks", "list_probes", "list_profiles", "list_targets", "load_activations",
    "load_config", "load_probe", "most_selective_neurons", "plot_activation_distributions",
    "plot_top_images", "load_probe_from_config", "load_probes", "load_target",
    "open_run", "parse_overrides", "pool", "resolve_device", "run_decode_once", "run_pipeline",
    "seed_everything",
]
