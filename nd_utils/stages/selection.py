"""Stage 06: best-concept selection (DnD step 3): score each candidate by its images' activations.

The target runs once over all concept images of all neurons of all DnD layers (every layer hooked
in the same forward pass); each neuron then ranks
the images of its own candidates together by its pooled activation (rank 0 = highest) and scores
candidate j from `H_j`, the ascending ranks of its images (METHODS.md section 3.3):

* `mean`: mean(H_j), lower is better.
* `topk-sq-mean`: mean of the squares of the first min(beta, |H_j|) ranks, lower is better.
* `image-products`: W_j = mean cosine between the vision-language embeddings of every D_top item
  and every image of j in the global top-zeta; -1 when it has none. Higher is better.
* `topk-compare` (the released default): R_j = |T| - position of j by topk-sq-mean (best = |T|),
  score = R_j * W_j. Higher is better.

Every function is selectable with `selection.scoring` (the reference ignores its own flag). They
are a `Registry` (`SCORINGS`, `list_scorings`); `register_scoring(name, higher=...)` adds one: a
function of the table of `score_candidates` (one row per candidate) giving each row's score.

Example:
    >>> scores = score_candidates({"dog": [0, 3], "cat": [1, 2]}, beta=5)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ..config import Config
from ..context import run_context
from ..hooks import trace_images
from ..stage_cache import Stage, register_stage, cached_stage, stage_output, stage_params
from ..scoring import check_scoring, rank_by, score_candidates
from ..store import atomic_write_text, save_tensors

ACT_STAGE = register_stage(Stage("06_concept_activations", "06_selection.ipynb", version=2,
                                reads=("target.name", "target.pooling"),
                                upstream=("05_concept_images",)))
BATCHES_PER_UNIT = 4     # target batches per executor unit of concept_activations
STAGE = register_stage(Stage("06_selection", "06_selection.ipynb", version=1,
                            reads=("selection.scoring", "selection.beta", "selection.zeta", "selection.labels"),
                            upstream=("03_top_images", "04_concepts", "06_concept_activations")))
@dataclass
class ConceptActivations:
    """Pooled activations `{layer: [n_images, K]}` and unit-norm VLM features `[n_images, D]`
    of every usable concept image of the DnD layers; `index` maps (concept, file) to the row."""

    activations: dict
    features: torch.Tensor
    index: pd.DataFrame
    key: str


@torch.no_grad()
def concept_activations(cfg: Config, layers: list[str], images: dict, target, vlm,
                        force: bool = False, progress: bool = True, features: bool = True,
                        executor=None) -> ConceptActivations:
    """Run the target (all `layers` hooked at once) and the VLM once over every usable image.

    `images` is {concept: ConceptImages}; a concept shared by neurons of several layers is
    decoded and embedded once. `features=False` skips the VLM (`features` is then `[0, 0]`):
    CoSy (stage 08) reads only the activations, and the VLM pass cost more than the target's.
    The images go in units of `BATCHES_PER_UNIT` batches to `executor` (default: the config's).
    """
    ctx = run_context(cfg)
    layers = list(layers)
    params = {**stage_params(cfg, ACT_STAGE), "layers": layers}
    inputs = {"vlm": vlm.backend_id, "weights": target.weights_id}
    if not features:  # another output, so another key; the VLM then decides nothing
        params["features"], inputs = False, {"weights": target.weights_id}
    out = stage_output(ACT_STAGE, params, inputs=inputs, upstream={
        "05_concept_images": sorted({ci.key for ci in images.values()})})

    def build(tmp: Path) -> dict:
        rows = [{"concept": c, "file": str(p)} for c, ci in images.items() for p in ci.files()]
        ex = executor or ctx.executor
        # units of whole batches: the target sees the same batches wherever a unit runs
        step = int(ctx.settings.activations.batch_size) * BATCHES_PER_UNIT
        units = [[r["file"] for r in rows[s:s + step]] for s in range(0, len(rows), step)]
        parts = ex.map(partial(concept_activation_unit, cfg, tuple(layers), features), units,
                       desc="concept activations", progress=progress,
                       local_kwargs={"target": target, "vlm": vlm})
        tensors = {f"activations.{layer}": torch.cat([p[0][layer] for p in parts]).contiguous()
                   if parts else torch.zeros(0, 0) for layer in layers}
        feats = [p[1] for p in parts if p[1] is not None]
        tensors["features"] = (torch.cat(feats) if feats else torch.zeros(0, 0)).contiguous()
        save_tensors(tensors, tmp / "concept_activations.safetensors")
        atomic_write_text(tmp / "index.csv", pd.DataFrame(
            rows, columns=["concept", "file"]).to_csv(index=False))
        return {"n_images": len(rows), "executor": ex.describe()}

    art = cached_stage(ctx.store, out, build, force=force)
    t = load_file(str(art.file("concept_activations.safetensors")))
    index = pd.read_csv(art.file("index.csv"), keep_default_na=False)
    return ConceptActivations({layer: t[f"activations.{layer}"] for layer in layers},
                              t["features"], index, art.key)


def label_image_activations(cfg: Config, labels, layers: list[str], target, vlm, prompt: str,
                            n_images: int, progress: bool = True
                            ) -> "dict[str, dict[str, torch.Tensor]]":
    """{label: {layer: `[Q, K]`}}: the target's activations on `n_images` images of each label,
    made from `prompt` by the configured synthesis backend (stage 05's cache) and run through
    `concept_activations` without VLM features. A label with no usable image is absent.
    CoSy's images: stage 08's and the trust scores' (`trust_scoring.CosySource`)."""
    from .synthesis import concept_images, load_synthesizer_from_config

    ccfg = cfg.with_overrides({"synthesis.prompt": prompt,
                               "synthesis.images_per_concept": int(n_images)})
    wanted = sorted({lab for lab in labels if lab})
    synth = load_synthesizer_from_config(ccfg, vlm=vlm)
    images, _ = concept_images(ccfg, wanted, synth, progress=progress)
    usable = {c: ci for c, ci in images.items() if len(ci.usable)}
    cacts = concept_activations(ccfg, list(layers), usable, target, vlm, progress=progress,
                                features=False)
    out = {}
    for concept, group in cacts.index.groupby("concept"):
        rows = torch.as_tensor(group.index.to_numpy().copy())
        out[concept] = {layer: cacts.activations[layer][rows] for layer in layers}
    return out


@torch.no_grad()
def concept_activation_unit(cfg: Config, layers: tuple, features: bool, files: list,
                            target=None, vlm=None) -> tuple[dict, "torch.Tensor | None"]:
    """One unit of `concept_activations`: pooled `{layer: [n, K]}` and VLM features `[n, D]`
    (None without `features`) of some concept image files, in order. Without `target`/`vlm`
    (a Ray worker) the configured ones are loaded once per process."""
    from ..backends.configured import load_target_from_config, load_vlm_from_config
    from ..backends.vlm import encode_images_in_batches
    from ..executors import worker_model

    target = target or worker_model("target", cfg, lambda: load_target_from_config(cfg))
    if features:
        vlm = vlm or worker_model("vlm", cfg, lambda: load_vlm_from_config(cfg))
    s = run_context(cfg).settings
    feats = []

    def embed(pil: list) -> None:
        v = torch.stack([vlm.preprocess(im) for im in pil]).to(vlm.device)
        # the trace cuts batches of activations.batch_size; the VLM takes vlm.batch_size
        feats.append(encode_images_in_batches(vlm, v, int(s.vlm.batch_size)).float().cpu())

    traced = trace_images(target, list(layers), list(files), s.target.pooling,
                          batch_size=int(s.activations.batch_size),
                          each_batch=embed if features else None)
    return ({layer: traced.pooled[layer] for layer in layers},
            torch.cat(feats) if feats else None)


def select_labels(cfg: Config, layer: str, top, concepts, cacts: ConceptActivations,
                  dtop_features: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 06 for one layer: (labels `Neuron ID, Label 1..n`, every candidate with scores)."""
    sel = run_context(cfg).settings.selection
    beta, zeta = int(sel.beta), int(sel.zeta)
    scoring, n_labels = sel.scoring, int(sel.labels)
    check_scoring(scoring)
    rows_of = {c: torch.as_tensor(g.index.to_numpy().copy())
               for c, g in cacts.index.groupby("concept")}
    labels, tables = [], []
    for unit in top.neurons:
        cands = [c for c in concepts.for_unit(unit) if c in rows_of]
        acts = {c: cacts.activations[layer][rows_of[c], unit].numpy() for c in cands}
        feats = {c: cacts.features[rows_of[c]] for c in cands}
        table = rank_by(score_candidates(acts, beta, zeta, dtop_features.get(unit), feats),
                        scoring)
        files = {c: cacts.index.file.to_numpy()[rows_of[c].numpy()] for c in cands}
        table["images"] = [";".join(files[c][np.argsort(-acts[c], kind="stable")][:3])
                           for c in table.candidate]
        missing = [c for c in concepts.for_unit(unit) if c not in rows_of]
        if missing:  # every image of these was blank or filtered: listed, never chosen
            table = pd.concat([table, pd.DataFrame({"candidate": missing, "images": "",
                                                    "rank": 0})], ignore_index=True)
        table.insert(0, "unit", unit)
        table.insert(0, "layer", layer)
        tables.append(table)
        chosen = list(table[table["rank"] > 0].sort_values("rank").candidate[:n_labels])
        labels.append({"Neuron ID": unit, **{f"Label {i + 1}": (chosen[i] if i < len(chosen)
                                                              else "") for i in range(n_labels)}})
    cols = ["layer", "unit", "rank", "candidate", "score", "mean", "topk_sq_mean",
            "image_products", "topk_compare", "n_images", "images"]
    cand = pd.concat(tables, ignore_index=True)[cols] if tables else pd.DataFrame(columns=cols)
    return pd.DataFrame(labels), cand
