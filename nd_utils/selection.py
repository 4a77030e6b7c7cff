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
from operator import itemgetter
from typing import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from .config import Config
from .errors import NdUtilsError
from .hooks import trace_images
from .registry import Registry
from .stages import STAGES, cached_stage, stage_output
from .store import ArtifactStore, atomic_write_text, save_tensors

ACT_STAGE = STAGES["06_concept_activations"]
BATCHES_PER_UNIT = 4     # target batches per executor unit of concept_activations
STAGE = STAGES["06_selection"]


@dataclass(frozen=True)
class Scoring:
    """A scoring function: `score(table)` gives a score per row of `score_candidates`' table;
    `higher`: is a higher score better?"""

    score: Callable[[pd.DataFrame], "pd.Series"]
    higher: bool


SCORINGS = Registry("scoring function", sort=False)


def register_scoring(name: str, score: "Callable | None" = None, *, higher: bool):
    """Add (or replace) the scoring `name`: `score(table) -> one value per row` (usable as a
    decorator); `higher` says whether a higher score is better. `selection.scoring: <name>`
    then selects it."""
    def add(fn: Callable) -> Callable:
        SCORINGS.register(name, Scoring(fn, bool(higher)))
        return fn
    return add(score) if score is not None else add


# the four of METHODS.md section 3.3, each a column of score_candidates' table
register_scoring("mean", itemgetter("mean"), higher=False)
register_scoring("topk-sq-mean", itemgetter("topk_sq_mean"), higher=False)
register_scoring("image-products", itemgetter("image_products"), higher=True)
register_scoring("topk-compare", itemgetter("topk_compare"), higher=True)


def list_scorings() -> list[str]:
    """Names of the scoring functions: the four of METHODS.md in its order, then any added with
    `register_scoring`."""
    return SCORINGS.names()


def candidate_ranks(activations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`H_j` per candidate: ascending global ranks of its images (rank 0 = highest activation)."""
    values = np.concatenate([np.asarray(activations[c], dtype=np.float64) for c in activations]) \
        if activations else np.zeros(0)
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(len(values))
    out, start = {}, 0
    for c in activations:
        n = len(activations[c])
        out[c] = np.sort(ranks[start:start + n])
        start += n
    return out


def topk_sq_mean(h: np.ndarray, beta: int = 5) -> float:
    k = min(int(beta), len(h))
    return float(np.mean(np.asarray(h[:k], dtype=np.float64) ** 2))


def score_candidates(activations: dict[str, np.ndarray], beta: int = 5, zeta: int = 10,
                     dtop_features: "torch.Tensor | None" = None,
                     image_features: "dict[str, torch.Tensor] | None" = None) -> pd.DataFrame:
    """All four scores for one neuron's candidates.

    `activations`: {candidate: its images' activations `[n_j]`} (candidates without images are
    left out by the caller). `dtop_features [n_top, D]` and `image_features` {candidate:
    `[n_j, D]`} (unit-norm) are needed for image-products and topk-compare (NaN without them).
    """
    H = candidate_ranks(activations)
    rows = []
    for c, h in H.items():
        w = float("nan")
        if dtop_features is not None and image_features is not None:
            in_top = h < int(zeta)
            if in_top.any():
                # images of c within the global top-zeta: positions in c's own list
                own = np.argsort(-np.asarray(activations[c]), kind="stable")[:int(in_top.sum())]
                feats = image_features[c][torch.as_tensor(own)]
                w = float((dtop_features.float() @ feats.float().T).mean())
            else:
                w = -1.0
        rows.append({"candidate": c, "mean": float(np.mean(h)), "topk_sq_mean": topk_sq_mean(h,
                     beta), "image_products": w, "n_images": len(h)})
    table = pd.DataFrame(rows, columns=["candidate", "mean", "topk_sq_mean", "image_products",
                                        "n_images"])
    position = table.topk_sq_mean.rank(method="first").astype(int) - 1
    table["topk_compare"] = (len(table) - position) * table.image_products
    return table


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise NdUtilsError(f"selection.scoring {scoring!r} is unknown: use one of "
                           f"{', '.join(list_scorings())}")
    return scoring


def rank_by(table: pd.DataFrame, scoring: str) -> pd.DataFrame:
    """Order candidates best first by `scoring`; adds `score` and `rank` (1 = chosen label)."""
    check_scoring(scoring)
    scorer = SCORINGS.get(scoring)
    out = table.assign(score=scorer.score(table))
    out = out.sort_values(["score", "candidate"], ascending=[not scorer.higher, True],
                          kind="stable")
    out = out.reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


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
    layers = list(layers)
    params = {**cfg.select(ACT_STAGE.reads), "layers": layers}
    inputs = {"vlm": vlm.backend_id, "weights": target.weights_id}
    if not features:  # another output, so another key; the VLM then decides nothing
        params["features"], inputs = False, {"weights": target.weights_id}
    out = stage_output(ACT_STAGE, params, inputs=inputs, upstream={
        "05_concept_images": sorted({ci.key for ci in images.values()})})

    def build(tmp: Path) -> dict:
        from .executors import executor_from_config

        rows = [{"concept": c, "file": str(p)} for c, ci in images.items() for p in ci.files()]
        ex = executor or executor_from_config(cfg)
        # units of whole batches: the target sees the same batches wherever a unit runs
        step = int(cfg["activations.batch_size"]) * BATCHES_PER_UNIT
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

    art = cached_stage(ArtifactStore(cfg.data_dir), out, build, force=force)
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
    from .backends.configured import load_target_from_config, load_vlm_from_config
    from .backends.vlm import encode_images_in_batches
    from .executors import worker_model

    target = target or worker_model("target", cfg, lambda: load_target_from_config(cfg))
    if features:
        vlm = vlm or worker_model("vlm", cfg, lambda: load_vlm_from_config(cfg))
    feats = []

    def embed(pil: list) -> None:
        v = torch.stack([vlm.preprocess(im) for im in pil]).to(vlm.device)
        # the trace cuts batches of activations.batch_size; the VLM takes vlm.batch_size
        feats.append(encode_images_in_batches(vlm, v, int(cfg["vlm.batch_size"])).float().cpu())

    traced = trace_images(target, list(layers), list(files), cfg["target.pooling"],
                          batch_size=int(cfg["activations.batch_size"]),
                          each_batch=embed if features else None)
    return ({layer: traced.pooled[layer] for layer in layers},
            torch.cat(feats) if feats else None)


def select_labels(cfg: Config, layer: str, top, concepts, cacts: ConceptActivations,
                  dtop_features: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 06 for one layer: (labels `Neuron ID, Label 1..n`, every candidate with scores)."""
    beta, zeta = int(cfg["selection.beta"]), int(cfg["selection.zeta"])
    scoring, n_labels = cfg["selection.scoring"], int(cfg["selection.labels"])
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
