"""Figures of the labelling stages: a neuron's top images beside its best concepts."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .activation_plots import draw_thumbnail
from ..stages.clip_dissect import n_concept_columns
from ..similarity_formulas import RANK_REORDER_FLOOR


def _score(x) -> "float | None":
    """A drawable score: a finite number above RANK_REORDER_FLOOR, else None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) and x > RANK_REORDER_FLOOR else None


def plot_neuron_labels(acts, probe, labels: pd.DataFrame, units: Sequence[int], k: int = 5,
                       n_concepts: int = 5, thumb: int = 112, title: str = "CLIP-Dissect",
                       save: "str | Path | None" = None):
    """One row per neuron: its k top probe images, then a bar chart of its best concepts.

    `acts` is a LayerActivations, `labels` the label table of the same layer (columns
    `unit, concept_j, score_j`; at most `n_concepts` of them are drawn, fewer when the table
    has fewer). Scores that are not finite numbers above `RANK_REORDER_FLOOR` (rank_reorder's
    mark for a concept with a mean cosine <= 0) are left out of the bars. Returns the Figure.
    """
    n_concepts = min(n_concepts, n_concept_columns(labels))
    k = min(k, acts.top_ids.shape[1])
    fig = plt.figure(figsize=(1.7 * k + 3.6, 1.9 * len(units)))
    grid = fig.add_gridspec(len(units), k + 2, width_ratios=[1] * k + [0.15, 2.2])
    by_unit = labels.set_index("unit")
    for r, unit in enumerate(units):
        for c in range(k):
            ax = fig.add_subplot(grid[r, c])
            idx = int(acts.top_ids[unit, c])
            draw_thumbnail(ax, probe, idx, thumb, f"{float(acts.top_values[unit, c]):.2f}")
            if c == 0:
                ax.set_ylabel(f"{acts.layer} #{unit}", fontsize=8)
        row = by_unit.loc[unit]
        pairs = [(str(row[f"concept_{j}"]), _score(row[f"score_{j}"]))
                 for j in range(1, n_concepts + 1)]
        pairs = [(n, s) for n, s in pairs if s is not None]
        ax = fig.add_subplot(grid[r, k + 1])
        if r == 0:
            ax.set_title(f"{title}: top concepts", fontsize=8)
        if not pairs:
            ax.set_xticks([]), ax.set_yticks([])
            ax.text(0.5, 0.5, "no scored concept", fontsize=8, ha="center", va="center",
                    transform=ax.transAxes)
            continue
        names, scores = [n for n, _ in pairs], [s for _, s in pairs]
        ax.barh(range(len(names))[::-1], scores, color="#dd8452")
        ax.set_yticks(range(len(names))[::-1], [n[:22] for n in names], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        lo, hi = min(scores), max(scores)
        pad = (hi - lo) * 0.5 + 1e-6
        ax.set_xlim(lo - pad, hi + pad * 0.2)
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=110)
    return fig


def plot_evaluation(table: pd.DataFrame, save: "str | Path | None" = None):
    """Final-layer evaluation: accuracy per similarity function, and label/class-name cosines.

    `table` is the output of `evaluate_final_layer`. Returns the matplotlib Figure.
    """
    acc = table.dropna(subset=["top1"]) if "top1" in table else table.iloc[0:0]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.6, 0.3 * len(table) + 0.8)))
    if len(acc):
        x = np.arange(len(acc))
        axes[0].bar(x - 0.2, acc["top1"], 0.4, label="top-1", color="#4c72b0")
        axes[0].bar(x + 0.2, acc["top5"], 0.4, label="top-5", color="#55a868")
        axes[0].set_xticks(x, acc["similarity"], rotation=20, fontsize=8)
        axes[0].set_ylabel("% of neurons labelled with their class")
        axes[0].set_title(f"concept set = class names ({acc['concept_set'].iloc[0]})", fontsize=9)
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no class-name concept set evaluated", ha="center")
    labels = [f"{r.concept_set}: {r.similarity}" for r in table.itertuples()]
    y = np.arange(len(table))
    axes[1].barh(y + 0.2, table["vlm_cos"], 0.4, label="VLM text space", color="#dd8452")
    axes[1].barh(y - 0.2, table["sentence_cos"], 0.4, label="sentence space", color="#8172b3")
    axes[1].set_yticks(y, labels, fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("mean cosine(label, class name)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=110)
    return fig
