"""Figures of stage 08: label-quality means with intervals, and CLIP-Dissect vs DnD per neuron.

Example:
    >>> fig = plot_label_quality(result.summary, result.table)        # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

METRIC_TITLES = {"auc": "CoSy AUC", "mad": "CoSy MAD (control SDs)", "auprc": "CoSy AUPRC",
                 "sim_r": "simulation r (Pearson)"}
# the order the sanity check expects, best first
SOURCE_ORDER = ["true class", "clip_dissect", "dnd", "shuffled clip_dissect", "shuffled dnd",
                "random concept", "constant 'depiction'"]
COLOURS = {"true class": "#4d4d4d", "clip_dissect": "#1f77b4", "dnd": "#d62728",
           "shuffled clip_dissect": "#9ecae1", "shuffled dnd": "#fcae91",
           "random concept": "#bdbdbd", "constant 'depiction'": "#e0e0e0"}


def plot_label_quality(summary: pd.DataFrame, table: "pd.DataFrame | None" = None,
                       save: "str | Path | None" = None):
    """Top row: mean of each metric per layer and label source with its bootstrap 95% interval.
    Bottom row (with `table`): each neuron's CLIP-Dissect and DnD values joined by a line.

    `summary` has `layer, source, metric, mean, ci_low, ci_high`; `table` the per-neuron rows
    (`layer, unit, source, <metrics>`).
    """
    import matplotlib.pyplot as plt

    metrics = [m for m in METRIC_TITLES if m in set(summary.metric)]
    rows = 2 if table is not None and len(table) else 1
    fig, axes = plt.subplots(rows, len(metrics), figsize=(4.2 * len(metrics), 3.6 * rows),
                             squeeze=False)
    layers = list(dict.fromkeys(summary.layer))
    sources = [s for s in SOURCE_ORDER if s in set(summary.source)]
    width = 0.8 / max(len(sources), 1)
    for j, metric in enumerate(metrics):
        ax = axes[0, j]
        s = summary[summary.metric == metric]
        for i, source in enumerate(sources):
            g = s[s.source == source].set_index("layer").reindex(layers)
            x = np.arange(len(layers)) + (i - (len(sources) - 1) / 2) * width
            mean = g["mean"].to_numpy(float)
            err = np.vstack([mean - g.ci_low.to_numpy(float), g.ci_high.to_numpy(float) - mean])
            ax.bar(x, mean, width, yerr=np.nan_to_num(err), capsize=2, label=source,
                   color=COLOURS.get(source, "#999999"), edgecolor="black", linewidth=0.3)
        ax.set_xticks(np.arange(len(layers)), layers)
        ax.set_title(METRIC_TITLES[metric])
        if metric in ("auc", "auprc"):
            ax.axhline(0.5 if metric == "auc" else 0, color="black", lw=0.6, ls=":")
        if j == 0:
            ax.set_ylabel("mean over neurons (95% CI)")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if rows == 2:
        for j, metric in enumerate(metrics):
            _paired_panel(axes[1, j], table, metric)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig


def _paired_panel(ax, table: pd.DataFrame, metric: str) -> None:
    wide = table[table.source.isin(["clip_dissect", "dnd"])].pivot_table(
        index=["layer", "unit"], columns="source", values=metric, aggfunc="first")
    if not {"clip_dissect", "dnd"} <= set(wide.columns):
        ax.set_axis_off()
        return
    layers = list(dict.fromkeys(wide.index.get_level_values(0)))
    for (layer, unit), r in wide.iterrows():
        c = f"C{layers.index(layer) % 10}"
        ax.plot([0, 1], [r.clip_dissect, r.dnd], "-o", color=c, ms=3, lw=0.8, alpha=0.8)
    for i, layer in enumerate(layers):
        ax.plot([], [], "-o", color=f"C{i % 10}", label=layer)
    ax.set_xticks([0, 1], ["CLIP-Dissect", "DnD"])
    ax.set_xlim(-0.3, 1.3)
    ax.set_title(f"{METRIC_TITLES[metric]}: per neuron", fontsize=9)
    ax.legend(fontsize=7)
