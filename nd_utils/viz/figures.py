"""Regenerate the figures of `figures/` from a run folder: PNG + PDF + a JSON sidecar each.

Figures (each one is skipped, with its reason printed, when its inputs are missing):
  neuron_cards_<layer>         a few neurons per layer: top images, DnD crops, both labels
  similarity_functions_<layer> final-layer evaluation per similarity function (07), beside
                               the published numbers (07_published.csv) when present
  label_similarity             per layer: CLIP-Dissect `similarity` (and DnD score) histograms
  evaluation_table             results/07_evaluation.csv rendered as a table
`<name>.json` names the run folder, its config, the result tables, the run.json stages and the
artifact keys (from their manifests) the figure came from. Nothing is computed: only results.

Example:
    $ python -m nd_utils figures latest --out figures/
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import REPO_ROOT
from ..errors import NdUtilsError
from .run_folders import RunView, open_run_folder
from ..store import atomic_write_bytes, atomic_write_text

GENERATOR = "nd_utils figures"  # marks sidecars this module wrote (only those are replaced)
DEFAULT_OUT = REPO_ROOT / "figures"


def readable_layers(view: RunView) -> list[str]:
    """Keep only the layers whose result tables read cleanly; return a note per dropped one.

    A table of another version (or a file whose name merely looks like a layer table) would
    otherwise make every neuron_table() call fail; the RunView's layer list is narrowed instead.
    """
    good, notes = [], []
    for layer in view.layers:
        try:
            for read in (view.clip_dissect, view.dnd, view.dnd_candidates, view.top_images):
                read(layer)
            good.append(layer)
        except NdUtilsError as exc:
            notes.append(f"layer {layer!r} left out: {exc}")
    view.__dict__["layers"] = good  # the cached_property's slot
    return notes


def cached_top_images(run: RunView, layer: str):
    """(TopImages with spatial maps, "") for DnD's 03_top_images artifact of `layer`, else
    (None, why); found by the run config's key, else through the paths of its 03 table."""
    from ..context import run_context
    from ..stages.top_images import STAGE, TopImages, choose_neurons, top_images_key

    cfg, folder, table = run.cfg, None, run.top_images(layer)
    if layer not in cfg.settings.dnd.layers and table is None:
        return None, f"spatial map not cached (layer {layer} is not in dnd.layers)"
    acts, probe, store = run.activations(layer), run.probe(), run_context(cfg).store
    if acts is not None and probe is not None:
        with contextlib.suppress(NdUtilsError):  # e.g. a target outside the registry
            key = top_images_key(cfg, layer, choose_neurons(cfg, layer, acts.n_neurons), probe)
            folder = store.path(STAGE.name, key) if store.exists(STAGE.name, key) else None
    if folder is None and table is not None and {"file", "path"} <= set(table.columns):
        rows = table[table["file"].astype(str) != ""]
        if len(rows):  # path = <artifact folder>/<file>
            p, f = Path(str(rows["path"].iloc[0])), Path(str(rows["file"].iloc[0]))
            folder = p.parents[len(f.parts) - 1]
    if folder is None or not (folder / "manifest.json").is_file():
        return None, (f"spatial map not cached (no 03_top_images artifact of layer {layer} in "
                      f"{cfg.data_dir}: run notebook 03 with this run's config)")
    items = pd.read_csv(folder / "items.csv", keep_default_na=False)
    if "map_index" not in items or not (folder / "maps.safetensors").is_file():
        vector = "map_index" in items and (pd.to_numeric(items["map_index"]) < 0).all()
        return None, (f"no spatial map: {layer} is a vector layer" if vector else
                      f"spatial map not cached (the 03_top_images artifact of {layer} predates "
                      f"spatial maps: rerun notebook 03 with --force)")
    key = json.loads((folder / "manifest.json").read_text()).get("key", folder.name)
    neurons = sorted(int(u) for u in items["unit"].unique())
    return TopImages(layer, neurons, items, folder, key), ""


@dataclass
class FiguresResult:
    """What `write_figures` did: files per figure, skipped figures with reasons."""

    out: Path
    written: dict = field(default_factory=dict)   # name -> [png, pdf, json]
    skipped: dict = field(default_factory=dict)   # name -> reason
    removed: list = field(default_factory=list)   # stale figures of an earlier run


class _Skip(Exception):
    """A figure's inputs are missing (the message says which and how to produce them)."""


def _new(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # no pyplot: nothing global, nothing displayed
    return fig


def blank(ax, text: str) -> None:
    """An axes that only says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8)
    ax.set_axis_off()


def _num(s) -> pd.Series:
    return pd.to_numeric(pd.Series(s).replace("", np.nan), errors="coerce")


def _save(fig: Figure, out: Path, name: str, sidecar: dict) -> list[Path]:
    """Write `<name>.png`, `.pdf` and `.json` atomically (PDF without a date: reproducible)."""
    paths = []
    for fmt, kw in (("png", {"dpi": 150}), ("pdf", {"metadata": {"CreationDate": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight", **kw)
        paths.append(atomic_write_bytes(out / f"{name}.{fmt}", buf.getvalue()))
    paths.append(atomic_write_text(out / f"{name}.json", json.dumps(sidecar, indent=2)))
    return paths


def _sidecar(run: RunView, name: str, stages: str, inputs: list[str], artifacts: dict) -> dict:
    """Provenance of one figure; `stages` = notebook numbers, e.g. "01 02 03 06"."""
    from .. import __version__

    used = [{k: s.get(k) for k in ("notebook", "status", "seconds", "executed")}
            for s in run.stages if str(s.get("notebook", ""))[:2] in stages.split()]
    return {"generator": GENERATOR, "figure": name, "files": [f"{name}.png", f"{name}.pdf"],
            "run": str(run.path), "config": str(run.path / "config.yaml"),
            "run_status": run.status, "inputs": [f"results/{i}" for i in inputs],
            "stages": used, "artifacts": artifacts, "nd_utils": __version__,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# --------------------------------------------------------------------------- the figures


def _pick_neurons(run: RunView, layer: str, n: int) -> list[int]:
    """DnD's neurons first (both methods label them), then the best CLIP-Dissect scores
    among distinct labels."""
    table = run.neuron_table()
    t = table[table["layer"] == layer]
    dnd = [int(u) for u in t[t["dnd_labels"].apply(lambda x: isinstance(x, list))]["unit"]]
    rest = t[~t["unit"].isin(dnd)].sort_values("cd_score", ascending=False, na_position="last")
    rest = rest.drop_duplicates("cd_label")  # distinct labels: more telling than 4 "vehicle"s
    return (dnd + [int(u) for u in rest["unit"]])[:n]


def _card_text(row) -> str:
    wrap = lambda s: textwrap.fill(s, 34, subsequent_indent="  ")  # noqa: E731
    lines = []
    if isinstance(row.cd_label, str):
        lines.append(wrap(f"CLIP-Dissect: {row.cd_label} ({row.cd_score:.3f})"))
        lines.append(wrap("  concepts: " + ", ".join(map(str, row.cd_concepts[1:4]))))
    if isinstance(row.dnd_labels, list):
        score = "" if pd.isna(row.dnd_score) else f" ({row.dnd_score:.3f})"
        lines.append(wrap(f"DnD: {' | '.join(row.dnd_labels)}{score}"))
    return "\n".join(lines) or "no labels"


def neuron_cards(run: RunView, layer: str, n: int = 4, k: int = 5, n_crops: int = 3):
    """Top images, crops (when DnD cached them) and both methods' labels for a few neurons."""
    inputs = [f"{kind}_{layer}.csv" for kind, ok in (
        ("02_clip_dissect", run.clip_dissect(layer) is not None),
        ("06_dnd", run.dnd(layer) is not None)) if ok]
    if not inputs:
        raise _Skip(f"no labels for layer {layer} (no 02_clip_dissect_{layer}.csv nor "
                    f"06_dnd_{layer}.csv): run notebook 02 or 03-06")
    tops, d_top = run.top_probe_images(layer, k), run.d_top(layer)
    if tops is None:
        raise _Skip(f"no top images for layer {layer}: its activation cache is missing from "
                    f"{run.cfg.data_dir} and there is no 03_top_images_{layer}.csv; run "
                    f"notebook 01 with this run's config")
    artifacts, acts = {}, run.activations(layer)
    if acts is not None:
        artifacts["01_activation_caching"] = {layer: acts.manifest.get("key")}
    crops = d_top[d_top["kind"] == "crop"] if d_top is not None else d_top
    if crops is not None and len(crops):
        inputs.append(f"03_top_images_{layer}.csv")
        top, _ = cached_top_images(run, layer)
        if top is not None:
            artifacts["03_top_images"] = {layer: top.key}
    units = _pick_neurons(run, layer, n)
    rows = run.neuron_table().set_index(["layer", "unit"])
    nc = n_crops if crops is not None and len(crops) else 0
    fig = _new(1.5 * (k + nc) + 3.4, 1.65 * len(units) + 0.5)
    grid = fig.add_gridspec(len(units), k + nc + 1, width_ratios=[1] * (k + nc) + [2.3])
    by_unit = {int(u): g for u, g in tops.groupby("unit")}
    crop_by = {int(u): g for u, g in crops.groupby("unit")} if nc else {}
    for r, unit in enumerate(units):
        items = [(x.path, x.image_id, f"#{x.image_id} {x.activation:.2f}", "black")
                 for x in by_unit[unit].head(k).itertuples()] if unit in by_unit else []
        items += [None] * (k - len(items))
        items += [(x.path, None, f"crop {x.activation:.2f}", "tab:orange")
                  for x in crop_by[unit].head(nc).itertuples()] if unit in crop_by else []
        for c, item in enumerate(items):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{layer}:{unit}", fontsize=9)
            for s in ax.spines.values():  # an empty slot keeps only the row's name
                s.set_edgecolor(item[3]) if item else s.set_visible(False)
            if item is None:
                continue
            with contextlib.suppress(OSError, ValueError):  # a moved image leaves a blank
                im = run.load_image(item[0], item[1])
                im.thumbnail((160, 160))
                ax.imshow(np.asarray(im))
            ax.set_title(item[2], fontsize=7, color=item[3])
        ax = fig.add_subplot(grid[r, -1])
        ax.set_axis_off()
        row = rows.loc[(layer, unit)] if (layer, unit) in rows.index else None
        ax.text(0, 0.5, _card_text(row) if row is not None else "no labels", fontsize=8,
                va="center", family="monospace")
    fig.suptitle(f"Neuron cards, layer {layer}: top probe images"
                 + (", attention crops (orange)" if nc else "") + ", labels", fontsize=10)
    fig.subplots_adjust(top=1 - 0.55 / fig.get_figheight())  # no gap under the title
    return fig, inputs, "01 02 03 04 05 06", artifacts


def _published_points(pub: "pd.DataFrame | None", fns: list[str]):
    """Published top-1 % per similarity function (ImageNet val rows) and cosine references."""
    if pub is None or not {"setup", "metric", "value"} <= set(pub.columns):
        return {}, []
    top1, lines = {}, []
    for r in pub.itertuples(index=False):
        last = str(r.setup).split(",")[-1].strip()
        if r.metric == "top-1 %" and "ImageNet val" in str(r.setup) and last in fns:
            top1.setdefault(last, float(r.value))
        elif str(r.metric).endswith("cos"):
            lines.append((f"{r.source}: {r.metric}", float(r.value)))
    return top1, lines


def similarity_functions(run: RunView):
    """Top-1/top-5 accuracy and label cosines per similarity function on the final layer."""
    ev = run.evaluation()
    if ev is None or not {"similarity", "concept_set"} <= set(ev.columns):
        raise _Skip("no results/07_evaluation.csv: run notebook 07")
    layer = run.cfg.settings.evaluation.layer
    ev = ev.assign(**{c: _num(ev[c]).values for c in ("top1", "top5", "vlm_cos", "sentence_cos")
                      if c in ev})
    acc = ev.dropna(subset=["top1"]) if "top1" in ev else ev.iloc[0:0]
    pub = run.published()
    top1_pub, cos_pub = _published_points(pub, list(acc["similarity"]))
    fig = _new(13, max(3.8, 0.32 * len(ev) + 1.2))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    if len(acc):
        x = np.arange(len(acc))
        ax1.bar(x - 0.2, acc["top1"], 0.4, label="top-1 (this run)", color="#4c72b0")
        ax1.bar(x + 0.2, acc["top5"], 0.4, label="top-5 (this run)", color="#55a868")
        px = [i for i, fn in enumerate(acc["similarity"]) if fn in top1_pub]
        if px:
            ax1.scatter(np.array(px) - 0.2, [top1_pub[acc["similarity"].iloc[i]] for i in px],
                        marker="*", s=120, color="black", zorder=3,
                        label="top-1 published (ResNet-50, ImageNet val)")
        ax1.set_xticks(x, acc["similarity"], rotation=20, fontsize=8)
        ax1.set_ylabel("% of neurons labelled with their class")
        ax1.set_title(f"{layer}, concept set = class names ({acc['concept_set'].iloc[0]})",
                      fontsize=9)
        ax1.set_ylim(0, 135)  # room for the legend above the bars and stars
        ax1.legend(fontsize=7, loc="upper left")
    else:
        blank(ax1, "no class-name concept set evaluated")
    y, cos = np.arange(len(ev)), [c for c in ("vlm_cos", "sentence_cos") if c in ev]
    for col in cos:
        ax2.barh(y + (0.2 if col == "vlm_cos" else -0.2), ev[col], 0.4,
                 label="VLM text space" if col == "vlm_cos" else "sentence space",
                 color="#dd8452" if col == "vlm_cos" else "#8172b3")
    colors = {}  # one colour per source, dashed = VLM text space, dotted = sentence space
    for lab, value in cos_pub if cos else []:
        c = colors.setdefault(lab.split(":")[0], f"C{len(colors) + 2}")
        ax2.axvline(value, color=c, ls="--" if "CLIP" in lab else ":", lw=1.2,
                    label=f"published {lab}")
    if cos:
        ax2.set_yticks(y, [f"{r.concept_set}: {r.similarity}" for r in ev.itertuples()],
                       fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("mean cosine(label, class name)")
        ax2.legend(fontsize=6, loc="lower right")
    else:
        blank(ax2, "no label cosines (vlm_cos, sentence_cos) in 07_evaluation.csv")
    fig.suptitle(f"Similarity functions on {layer}", fontsize=10)
    fig.tight_layout()
    inputs = ["07_evaluation.csv"] + (["07_published.csv"] if pub is not None else [])
    return fig, inputs, "07", {}


def label_similarity(run: RunView):
    """Per-layer histograms of CLIP-Dissect's label similarity and DnD's best score."""
    cd = {x: _num(t["similarity"]).dropna() for x in run.layers
          if (t := run.clip_dissect(x)) is not None}
    table = run.neuron_table()
    dnd = {x: _num(table[table["layer"] == x]["dnd_score"]).dropna() for x in run.layers}
    dnd = {x: s for x, s in dnd.items() if len(s)}
    layers = [x for x in run.layers if x in cd or x in dnd]
    if not layers:
        raise _Skip("no label tables (02_clip_dissect_<layer>.csv or 06_dnd_candidates_<layer>"
                    ".csv): run notebook 02 or 03-06")
    rows = [("CLIP-Dissect similarity", cd, "#4c72b0")] if cd else []
    rows += [("DnD score (best candidate)", dnd, "#dd8452")] if dnd else []
    fig = _new(3.4 * len(layers), 2.6 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), len(layers), squeeze=False)
    for (title, data, color), line in zip(rows, axes):
        for layer, ax in zip(layers, line):
            s = data.get(layer)
            if s is None or not len(s):
                blank(ax, f"no {title.split()[0]} labels")
                continue
            ax.hist(s, bins=min(30, max(5, len(s) // 4)), color=color)
            if len(s) < 30:  # a few neurons (DnD's): show each value, not only the bins
                ax.plot(s, np.zeros(len(s)), "|", color="black", ms=14, clip_on=False)
            ax.axvline(s.median(), color="black", lw=1, ls="--")
            ax.set_title(f"{layer}: {title}\n{len(s)} neurons, median {s.median():.3f}",
                         fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    inputs = [f"02_clip_dissect_{x}.csv" for x in cd] + [f"06_dnd_candidates_{x}.csv" for x in dnd]
    return fig, inputs, "02 03 04 05 06", {}


def evaluation_table(run: RunView):
    """07_evaluation.csv as a table figure (numbers to 4 significant digits)."""
    ev = run.evaluation()
    if ev is None or not len(ev):
        raise _Skip("no results/07_evaluation.csv: run notebook 07")
    fmt = lambda v: str(v) if np.isnan(n := _num([v])[0]) else (  # noqa: E731
        str(int(n)) if n == int(n) else f"{n:.4g}")
    cells = [[fmt(v) for v in r] for r in ev.itertuples(index=False)]
    chars = [max(len(str(c)), *(len(r[j]) for r in cells)) + 2 for j, c in enumerate(ev.columns)]
    fig = _new(0.075 * sum(chars) + 0.2, 0.24 * (len(ev) + 1) + 0.5)  # sized to the text
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    ax.set_axis_off()
    tab = ax.table(cellText=cells, colLabels=list(ev.columns), cellLoc="right",
                   colWidths=[c / sum(chars) for c in chars], bbox=(0, 0, 1, 1))
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    ax.set_title(f"Final-layer evaluation ({run.name})", fontsize=10)
    return fig, ["07_evaluation.csv"], "07", {}


# --------------------------------------------------------------------------- the command


def write_figures(run: "str | Path | RunView" = "latest", out: "str | Path | None" = None, *,
                  neurons_per_layer: int = 4, log=print) -> FiguresResult:
    """Regenerate every figure from a run folder into `out` (default: the repo's figures/).

    Figures whose inputs are missing are skipped (reason logged); figures this command wrote
    earlier that the run cannot produce are removed, so `out` shows one run only.
    """
    view = open_run_folder(run)
    result = FiguresResult(Path(out).expanduser().resolve() if out else DEFAULT_OUT)
    result.out.mkdir(parents=True, exist_ok=True)
    for note in readable_layers(view):
        log(f"note: {note}")
    jobs = [(f"neuron_cards_{re.sub(r'[^A-Za-z0-9._-]', '_', layer)}",
             lambda layer=layer: neuron_cards(view, layer, neurons_per_layer))
            for layer in view.layers]
    final = re.sub(r"[^A-Za-z0-9._-]", "_", view.cfg.settings.evaluation.layer)
    jobs += [(f"similarity_functions_{final}", lambda: similarity_functions(view)),
             ("label_similarity", lambda: label_similarity(view)),
             ("evaluation_table", lambda: evaluation_table(view))]
    for name, make in jobs:
        try:
            fig, inputs, stages, artifacts = make()
        except _Skip as why:
            result.skipped[name] = str(why)
            log(f"skipped {name}: {why}")
            continue
        result.written[name] = _save(fig, result.out, name,
                                     _sidecar(view, name, stages, inputs, artifacts))
        log(f"wrote {name}.png / .pdf / .json")
    for side in sorted(result.out.glob("*.json")):  # stale figures of this command only
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(side.read_text())
            if meta.get("generator") == GENERATOR and meta.get("figure") not in result.written:
                for f in [*meta.get("files", []), side.name]:
                    (result.out / Path(f).name).unlink(missing_ok=True)
                result.removed.append(meta.get("figure"))
                log(f"removed {meta.get('figure')}: this run does not produce it")
    return result
