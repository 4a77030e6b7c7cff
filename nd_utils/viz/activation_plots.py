"""Figures of stage 01: activation distributions per layer and a neuron's top images."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np


def plot_activation_distributions(acts: dict, bins: int = 60, save: "str | Path | None" = None):
    """One histogram per layer of all pooled activations (log counts), with per-neuron spread.

    `acts` maps layer name -> LayerActivations. Returns the matplotlib Figure.
    """
    fig, axes = plt.subplots(1, len(acts), figsize=(4.2 * len(acts), 3.2), squeeze=False)
    for ax, (layer, a) in zip(axes[0], acts.items()):
        values = a.activations.numpy()
        ax.hist(values.ravel(), bins=bins, color="#4c72b0", log=True)
        means = values.mean(0)
        ax.set_title(f"{layer}  [{a.n_images} x {a.n_neurons}]", fontsize=10)
        ax.set_xlabel("pooled activation")
        ax.text(0.98, 0.95, f"neuron means\n{means.min():.2f} .. {means.max():.2f}",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
    axes[0][0].set_ylabel("count (log)")
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=110)
    return fig


def most_selective_neurons(a, n: int = 4) -> list[int]:
    """Neurons whose top activation stands furthest above their mean (in std units)."""
    values = a.activations
    z = (a.top_values[:, 0] - values.mean(0)) / (values.std(0) + 1e-8)
    return [int(i) for i in z.argsort(descending=True)[:n]]


def draw_thumbnail(ax, probe, idx: int, thumb: int, title: str = "") -> None:
    """Show probe image `idx` shrunk to at most `thumb` pixels, without ticks."""
    img = probe.load_image(idx).copy()
    img.thumbnail((thumb, thumb))
    ax.imshow(np.asarray(img))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def plot_top_images(a, probe, neurons: Sequence[int], k: int = 6, thumb: int = 112,
                    save: "str | Path | None" = None):
    """Grid: one row per neuron, its k highest-activating probe images with values and labels."""
    k = min(k, a.top_ids.shape[1])
    fig, axes = plt.subplots(len(neurons), k, figsize=(1.6 * k, 1.8 * len(neurons)),
                             squeeze=False)
    for row, unit in zip(axes, neurons):
        for col, ax in enumerate(row):
            idx = int(a.top_ids[unit, col])
            label = probe.items[idx].label or ""
            draw_thumbnail(ax, probe, idx, thumb, f"{a.top_values[unit, col]:.2f}\n{label[:16]}")
            if col == 0:
                ax.set_ylabel(f"{a.layer}\n#{unit}", fontsize=8)
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=110)
    return fig
