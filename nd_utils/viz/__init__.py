"""Looking at results: plots for the notebooks, the run reader, the HTML report, the explorer
and the regenerated `figures/`.

Modules: `activation_plots`, `label_plots`, `dnd_plots`, `quality_plots` (matplotlib figures the
notebooks draw), `run_folders` (a finished run folder as tables; its neuron table in
`neuron_table`), `trust_plots` (labels' held-out
trust scores as text, neurons ranked by trust), `report` (static HTML),
`explorer` (ipywidgets over a run; its records in `explorer_view`, its figure in
`explorer_figure`) and `figures` (PNG + PDF + JSON provenance). Their public
verbs are this package's names, loaded on first use (`nd.viz.plot_evaluation`,
`nd.viz.write_report`, ...): `import nd_utils.viz` imports no plotting library.
"""
from __future__ import annotations

import importlib

# name -> module of this package
_EXPORTS = {
    "NeuronExplorer": "explorer",
    "most_selective_neurons": "activation_plots",
    "plot_activation_distributions": "activation_plots",
    "plot_concept_images": "dnd_plots",
    "plot_crop_boxes": "dnd_plots",
    "plot_dnd_neuron": "dnd_plots",
    "plot_evaluation": "label_plots",
    "plot_label_quality": "quality_plots",
    "plot_neuron_labels": "label_plots",
    "plot_top_images": "activation_plots",
    "plot_top_items": "dnd_plots",
    "plot_trust_summary": "trust_figure",
    "rank_by_trust": "trust_plots",
    "trust_text": "trust_plots",
    "write_figures": "figures",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nd_utils.viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
