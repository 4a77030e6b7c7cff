"""The per-layer trust figure of stage 02: how many neurons have a trusted label, per layer.

The modern form of Network Dissection's "unique detectors per layer" plot: instead of counting
neurons whose IoU with a densely annotated concept passes a threshold, it counts neurons whose
label predicts their activations on held-out images better than random concepts do
(Benjamini-Hochberg q < alpha), and shows each layer's held-out r beside it.

Example:
    >>> fig = plot_trust_summary(summary, tables, save="02_trust.png")    # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_trust_summary(summary: pd.DataFrame, tables: "dict[str, pd.DataFrame] | None" = None,
                       save: "str | Path | None" = None):
    """Left: trusted neurons per layer (bars: the fraction, labels: the counts); right: each
    layer's held-out r (box plot, trusted neurons as dots) when `tables` (the label tables with
    trust columns) are given. Returns the matplotlib figure; `save` writes it as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = list(summary["layer"])
    panels = 2 if tables else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + 1, 3.4), squeeze=False)
    ax = axes[0, 0]
    frac = summary["fraction_trusted"].fillna(0).to_numpy()
    bars = ax.bar(range(len(layers)), frac, color="#3b7dd8")
    for bar, n, tot in zip(bars, summary["n_trusted"], summary["n_neurons"]):
        ax.annotate(f"{int(n)}/{int(tot)}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    alpha = float(summary["alpha"].iloc[0]) if len(summary) else float("nan")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    ax.set_ylabel("fraction of neurons")
    ax.set_ylim(0, max(0.05, float(frac.max()) * 1.25 if len(frac) else 1))
    ax.set_title(f"trusted labels (BH q < {alpha:g})", fontsize=10)
    if tables:
        ax = axes[0, 1]
        data = [pd.to_numeric(tables[layer]["heldout_r"], errors="coerce").dropna().to_numpy()
                for layer in layers]
        ax.boxplot(data, positions=range(len(layers)), widths=0.5, showfliers=False)
        for i, layer in enumerate(layers):
            t = tables[layer]
            r = pd.to_numeric(t.loc[t["trusted"].astype(bool), "heldout_r"], errors="coerce")
            ax.plot([i] * len(r), r, ".", color="#d83b3b", alpha=0.5, markersize=3,
                    label="trusted" if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
        ax.set_ylabel("held-out r")
        ax.set_title("simulation r on held-out images", fontsize=10)
        if any(len(d) for d in data):
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=120)
    return fig
