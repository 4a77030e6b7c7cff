"""Figures for Describe-and-Dissect: D_top with crop boxes, and one card per neuron.

Example:
    >>> fig = plot_top_items(top, units=[0, 1])                         # doctest: +SKIP
    >>> fig = plot_dnd_neuron(top, captions, selection, unit=0)         # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import Rectangle
from PIL import Image



def _boxes_by_image(top, unit: int) -> dict[int, list[tuple[int, ...]]]:
    crops = top.crops(unit)
    out: dict[int, list] = {}
    for image_id, box in zip(crops.image_id, crops.box):
        out.setdefault(int(image_id), []).append(tuple(int(v) for v in box.split(",")))
    return out


def plot_top_items(top, units: "list[int] | None" = None, n: int = 10, save=None):
    """Rows = neurons; D_top items best first (crops outlined in orange, with activations)."""
    units = list(units if units is not None else top.neurons)
    fig, axes = plt.subplots(len(units), n, figsize=(1.5 * n, 1.7 * len(units)), squeeze=False)
    for r, unit in enumerate(units):
        items = top.d_top(unit).head(n)
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(items):
                continue
            it = items.iloc[c]
            ax.imshow(top.image(it.file))
            ax.set_title(f"{it.kind} {it.activation:.2f}", fontsize=7,
                         color="tab:orange" if it.kind == "crop" else "black")
        axes[r][0].text(-0.1, 0.5, f"{top.layer}:{unit}", transform=axes[r][0].transAxes,
                        ha="right", va="center", fontsize=9)
    fig.suptitle(f"D_top per neuron (layer {top.layer}): originals and attention crops",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, save)
    return fig


def plot_crop_boxes(top, unit: int, n: int = 5, save=None):
    """The neuron's top originals with their attention-crop boxes drawn on them."""
    boxes = _boxes_by_image(top, unit)
    originals = top.items[(top.items.unit == unit) & (top.items.kind == "original")]
    originals = originals.sort_values("activation", ascending=False).head(n)
    fig, axes = plt.subplots(1, max(len(originals), 1), figsize=(2.2 * max(len(originals), 1), 2.4),
                             squeeze=False)
    for ax, (_, it) in zip(axes[0], originals.iterrows()):
        im = Image.open(it.probe_path).convert("RGB") if it.probe_path else None
        size = 375  # boxes are in pixels of the dnd.crops.size square
        if im is not None:
            ax.imshow(im.resize((size, size)))
        for (x0, y0, x1, y1) in boxes.get(int(it.image_id), []):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                   color="tab:orange"))
        ax.set_title(f"image {it.image_id}: {len(boxes.get(int(it.image_id), []))} crops",
                     fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{top.layer}:{unit} attention crops", fontsize=10)
    fig.tight_layout()
    _save(fig, save)
    return fig


def plot_dnd_neuron(top, captions: pd.DataFrame, candidates: pd.DataFrame, unit: int,
                    n_top: int = 5, n_images: int = 3, save=None):
    """Card of one neuron: D_top items with captions, then each candidate with its best images."""
    cand = candidates[(candidates.unit == unit)].sort_values("rank")
    cand = pd.concat([cand[cand["rank"] > 0], cand[cand["rank"] == 0]])
    rows = 1 + max(len(cand), 1)
    cols = max(n_top, n_images + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    items = top.d_top(unit).head(n_top)
    caps = captions[captions.unit == unit].set_index("rank").caption.to_dict()
    for c, (_, it) in enumerate(items.iterrows()):
        _thumb(axes[0][c], top.image(it.file),
                       f"{it.kind} {it.activation:.2f}\n{_short(caps.get(it['rank'], ''))}")
    for r, (_, row) in enumerate(cand.iterrows(), start=1):
        chosen = "  <- label" if row["rank"] == 1 else ""
        score = "" if row["rank"] == 0 else f"\nscore {row.score:.3g}"
        axes[r][0].text(0.0, 0.5, f"#{row['rank'] or '-'} {_short(row.candidate, 28)}{chosen}"
                        f"{score}", fontsize=8, va="center", transform=axes[r][0].transAxes)
        for c, path in enumerate([p for p in str(row.images).split(";") if p][:n_images],
                                 start=1):
            with Image.open(path) as im:
                _thumb(axes[r][c], im.convert("RGB"), "")
    fig.suptitle(f"DnD · {top.layer}:{unit} · top: D_top with captions; rows: candidates "
                 f"and their best concept images", fontsize=9)
    fig.tight_layout()
    _save(fig, save)
    return fig


def _thumb(ax, image: Image.Image, title: str, size: int = 160) -> None:
    image = image.copy()
    image.thumbnail((size, size))
    ax.imshow(image)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _short(text: str, n: int = 34) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n - 1] + "…"


def _save(fig, save) -> None:
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=110, bbox_inches="tight")


def plot_concept_images(images: dict, n_concepts: int = 6, n: int = 5, save=None):
    """Rows = the first `n_concepts` concepts of `{concept: ConceptImages}`; up to `n` of each
    concept's images (excluded ones included, as they were made)."""
    shown = list(images)[:n_concepts]
    fig, axes = plt.subplots(len(shown), n, figsize=(1.8 * n, 1.9 * len(shown)), squeeze=False)
    for r, concept in enumerate(shown):
        files = images[concept].files(usable=False)[:n]
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(files):
                ax.imshow(plt.imread(files[c]))
        axes[r][0].set_title(concept[:40], fontsize=8, loc="left")
    fig.tight_layout()
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=100)
    return fig
