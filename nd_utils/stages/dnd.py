"""Describe-and-Dissect end to end: one call per notebook (03-06) over the configured layers.

Each call reads its upstream stages from the artifact store and computes the ones that are
missing (the same content-addressed keys, so nothing is computed twice); stage 01 must exist,
or the error names notebook 01. Layers and neurons come from `dnd.layers` / `dnd.neurons`.

Example:
    >>> cfg = load_config("offline")                                   # doctest: +SKIP
    >>> tops = dnd_top_images(cfg)          # 03: D_top with attention crops
    >>> caps = dnd_captions(cfg)            # 03: captions
    >>> concepts = dnd_concepts(cfg)        # 04: candidate concepts
    >>> images, stats = dnd_synthesis(cfg)  # 05: concept images
    >>> result = dnd_selection(cfg)         # 06: labels + candidate scores
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..backends.configured import (language_model_from_config, load_captioner_from_config,
                                  load_target_from_config, load_vlm_from_config)
from .captions import cache_captions, caption_key
from .candidate_concepts import STAGE as CONCEPT_STAGE
from .candidate_concepts import LayerConcepts, concepts_key, generate_concepts
from ..config import Config
from ..context import run_context
from ..machine import seed_everything
from .selection import STAGE as SELECT_STAGE
from .selection import concept_activations, select_labels
from ..stage_cache import cached_stage, stage_output, Table, stage_params
from ..store import atomic_write_text
from .synthesis import ConceptImages, concept_images, load_synthesizer_from_config
from .top_images import TopImages, build_top_images

# the tables of DnD's notebooks 03-06, written here (write_top_image_tables, write_dnd_tables)
TABLES = (Table("top_images", "03_top_images_{}.csv",
                ("unit", "rank", "image_id", "path", "activation"), "03"),
          Table("dnd", "06_dnd_{}.csv", ("Neuron ID", "Label 1"), "03-06"),
          Table("dnd_candidates", "06_dnd_candidates_{}.csv",
                ("unit", "rank", "candidate", "score", "images"), "03-06"))


def dnd_layers(cfg: Config) -> list[str]:
    return list(run_context(cfg).settings.dnd.layers)


def dnd_top_images(cfg: Config, force: bool = False, progress: bool = True
                   ) -> dict[str, TopImages]:
    """Stage 03a for every DnD layer (see `build_top_images`)."""
    seed_everything(int(run_context(cfg).settings.seed))
    return {layer: build_top_images(cfg, layer, force=force, progress=progress)
            for layer in dnd_layers(cfg)}


def dnd_captions(cfg: Config, force: bool = False, progress: bool = True,
                 tops: "dict[str, TopImages] | None" = None) -> dict[str, pd.DataFrame]:
    """Stage 03b: captions of every D_top item, per layer (the captioner loads only if needed)."""
    ctx = run_context(cfg)
    tops = tops or dnd_top_images(cfg, progress=progress)
    todo = force or any(not ctx.store.exists("03_captions", caption_key(cfg, t))
                        for t in tops.values())
    captioner = load_captioner_from_config(cfg) if todo and ctx.executor.name == "local" else None
    return {layer: cache_captions(cfg, top, captioner, force=force) for layer, top in tops.items()}


def dnd_concepts(cfg: Config, force: bool = False, progress: bool = True, lm=None,
                 tops: "dict[str, TopImages] | None" = None,
                 captions: "dict[str, pd.DataFrame] | None" = None) -> dict[str, LayerConcepts]:
    """Stage 04: candidate concepts per neuron, per layer (`tops`, `captions`: stage 03's)."""
    ctx = run_context(cfg)
    tops = tops or dnd_top_images(cfg, progress=progress)
    caps = captions or dnd_captions(cfg, progress=progress, tops=tops)
    store, keys = ctx.store, {layer: caption_key(cfg, tops[layer]) for layer in tops}
    # on Ray each worker loads the model itself; here it is loaded once for every layer
    if lm is None and ctx.executor.name == "local" and (force or any(
            not store.exists(CONCEPT_STAGE.name, concepts_key(cfg, layer, k))
            for layer, k in keys.items())):
        lm = language_model_from_config(cfg)
    return {layer: generate_concepts(cfg, layer, caps[layer], keys[layer], lm=lm, force=force,
                                     progress=progress) for layer in tops}


def dnd_synthesis(cfg: Config, progress: bool = True, synth=None, force: bool = False,
                  concepts: "dict[str, LayerConcepts] | None" = None
                  ) -> tuple[dict[str, ConceptImages], dict]:
    """Stage 05: images of every candidate of every layer, each concept once; plus counters.

    `force` makes the images of this run's candidates again (other stages' caches are kept);
    `concepts`: stage 04's result (read or computed when None)."""
    concepts = concepts or dnd_concepts(cfg, progress=progress)
    wanted = [c for lc in concepts.values() for c in lc.candidates.candidate]
    images, stats = concept_images(cfg, wanted, synth, progress=progress, force=force)
    stats["images_excluded"] = int(sum((ci.table.status != "ok").sum() for ci in images.values()))
    return images, stats


@dataclass
class LayerSelection:
    layer: str
    labels: pd.DataFrame        # Neuron ID, Label 1, Label 2, Label 3
    candidates: pd.DataFrame    # every candidate with its scores
    key: str
    seconds: float = 0.0
    manifest: dict = field(default_factory=dict)


def dnd_selection(cfg: Config, force: bool = False, progress: bool = True, synth=None,
                  target=None, vlm=None, tops: "dict[str, TopImages] | None" = None,
                  concepts: "dict[str, LayerConcepts] | None" = None,
                  images: "dict[str, ConceptImages] | None" = None) -> dict[str, LayerSelection]:
    """Stage 06: best-concept selection per layer (one target pass over all concept images).

    `target` / `vlm`: already loaded models of `target.name` / `vlm.name` (loaded when None);
    `tops`, `concepts`, `images` (of every candidate): stages 03a, 04 and 05's results."""
    ctx = run_context(cfg)
    tops = tops or dnd_top_images(cfg, progress=progress)
    concepts = concepts or dnd_concepts(cfg, progress=progress, tops=tops)
    t0 = time.time()
    target = target or load_target_from_config(cfg)
    vlm = vlm or load_vlm_from_config(cfg)
    if images is None:
        # here, not on workers: stage 05 made the images already (on Ray too), this finds them
        synth = synth or load_synthesizer_from_config(cfg, vlm=vlm)
        needed = [c for lc in concepts.values() for c in lc.candidates.candidate]
        images, _ = concept_images(cfg, needed, synth, progress=progress)
    usable = {c: ci for c, ci in images.items() if len(ci.usable)}
    cacts = concept_activations(cfg, list(tops), usable, target, vlm, force=force,
                                progress=progress)
    out = {}
    for layer, top in tops.items():
        lc = concepts[layer]

        def build(tmp: Path) -> None:
            labels, cand = select_labels(cfg, layer, top, lc, cacts, _dtop_features(
                top, vlm, int(ctx.settings.vlm.batch_size)))
            atomic_write_text(tmp / "labels.csv", labels.to_csv(index=False))
            atomic_write_text(tmp / "candidates.csv", cand.to_csv(index=False))

        spec = stage_output(SELECT_STAGE, {**stage_params(cfg, SELECT_STAGE), "layer": layer},
                            upstream={"03_top_images": top.key, "04_concepts": lc.key,
                                      "06_concept_activations": cacts.key})
        art = cached_stage(ctx.store, spec, build, force=force,
                           extra={"layer": layer, "n_neurons": len(top.neurons)})
        out[layer] = LayerSelection(
            layer, pd.read_csv(art.file("labels.csv"), keep_default_na=False),
            pd.read_csv(art.file("candidates.csv"), keep_default_na=False), art.key,
            time.time() - t0, art.manifest)
    return out


@torch.no_grad()
def _dtop_features(top: TopImages, vlm, batch_size: "int | None" = None
                   ) -> dict[int, torch.Tensor]:
    """Unit-norm VLM embeddings `[n_top, D]` of each neuron's D_top items, at most
    `batch_size` (`vlm.batch_size`) images per encoder call."""
    from ..backends.vlm import encode_images_in_batches

    out = {}
    for unit in top.neurons:
        files = list(top.d_top(unit).file)
        x = torch.stack([vlm.preprocess(top.image(f)) for f in files]).to(vlm.device)
        out[unit] = encode_images_in_batches(vlm, x, batch_size).float().cpu()
    return out


def write_dnd_tables(results: "str | Path", selection: dict[str, LayerSelection],
                     trust: "dict[str, pd.DataFrame] | None" = None) -> dict[str, Path]:
    """`06_dnd_<layer>.csv` (the reference's schema, then `heldout_r, heldout_p, cosy_auc` of
    Label 1 when `trust` is given: `dnd_label_trust`) and `06_dnd_candidates_<layer>.csv`."""
    out = {}
    for layer, sel in selection.items():
        path = TABLES[1].path(results, layer)
        labels = sel.labels
        if trust and layer in trust:
            t = trust[layer].set_index("Neuron ID").reindex(labels["Neuron ID"].astype(int))
            labels = labels.assign(**{c: t[c].to_numpy(dtype=float)
                                      for c in ("heldout_r", "heldout_p", "cosy_auc")})
        atomic_write_text(path, labels.to_csv(index=False))
        atomic_write_text(TABLES[2].path(results, layer),
                          sel.candidates.to_csv(index=False))
        out[layer] = path
    return out


def dnd_vs_clip_dissect(cfg: Config, selection: dict[str, LayerSelection],
                        results: "str | Path | None" = None) -> pd.DataFrame:
    """One row per DnD neuron: its DnD `Label 1` beside CLIP-Dissect's label of the same unit
    (empty for a layer outside `target.layers`); written to
    `06_labels_dnd_vs_clip_dissect.csv` when `results` is given."""
    from .clip_dissect import dissect_layer

    rows, cd_layers = [], run_context(cfg).settings.target.layers
    for layer, s in selection.items():
        cd = dissect_layer(cfg, layer) if layer in cd_layers else None
        for _, r in s.labels.iterrows():
            unit = int(r["Neuron ID"])
            rows.append({"layer": layer, "unit": unit, "DnD": r["Label 1"],
                         "CLIP-Dissect": cd.description[unit] if cd is not None else ""})
    table = pd.DataFrame(rows)
    if results is not None:
        atomic_write_text(Path(results) / "06_labels_dnd_vs_clip_dissect.csv",
                          table.to_csv(index=False))
    return table


def write_top_image_tables(results: "str | Path", tops: dict[str, TopImages],
                           captions: "dict[str, pd.DataFrame] | None" = None) -> dict[str, Path]:
    """`03_top_images_<layer>.csv`: every original and crop with absolute paths (+ captions)."""
    out = {}
    for layer, top in tops.items():
        t = top.items.copy()
        t["path"] = [str(top.path / f) if f else p for f, p in zip(t.file, t.probe_path)]
        if captions is not None and layer in captions:
            c = captions[layer][["unit", "rank", "caption"]]
            t = t.merge(c, on=["unit", "rank"], how="left")
            t.loc[t["rank"] == 0, "caption"] = ""
        path = TABLES[0].path(results, layer)
        atomic_write_text(path, t.to_csv(index=False))
        out[layer] = path
    return out
