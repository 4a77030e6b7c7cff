"""Stage 02: CLIP-Dissect labels for every neuron of the configured layers.

Pipeline (METHODS.md section 2): image features `I [N, D]` of the probe set (cached in stage
01's decode-once pass), text features `T [M, D]` of the concept set, `P = I @ T.T [N, M]` (plain
cosines, passed as its factors and computed block by block: never whole),
`sim = f(P, activations [N, K]) [K, M]`, label of neuron k = `argmax_m sim[k, m]`.

Every step is an artifact keyed by content: image features by (vlm, probe content), text
features by (vlm, concept list hash, template, cleaning), labels by (similarity function,
hyper-parameters, the three upstream keys).

Example:
    >>> cfg = load_config("offline")                                   # doctest: +SKIP
    >>> labels = dissect_layer(cfg, "fc")                              # doctest: +SKIP
    >>> labels[["unit", "description", "similarity"]].head()           # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from .activations import activation_key, load_activations, load_probe_from_config
from ..concept_sets import ConceptSet, load_concept_set
from ..config import Config
from ..context import run_context
from ..errors import ConfigError, DamagedArtifactError, MissingArtifactError
from .image_features import image_feature_key, load_image_features, vlm_key_params
from ..probe_set import ProbeSet
from ..cosines import Cosines, factorized
from ..similarity import get_similarity, similarity_on_device, top_concepts
from ..stage_cache import (Stage, register_stage, StageOutput, cached_stage, stage_output, Table,
                           stage_params)
from ..store import ArtifactStore, atomic_write_text, save_tensors
from ..backends.configured import load_vlm_from_config
from ..backends.vlm import VisionLanguageModel

TEXT_STAGE = register_stage(Stage("02_text_features", "02_clip_dissect.ipynb", version=1,
                                 reads=("vlm.name", "clip_dissect.concept_set", "clip_dissect.clean",
                                        "clip_dissect.template")))
# v2: rank_reorder floors pairs with mean cosine <= 0 (was NaN, ranked first); label
# tables rank NaN last and break ties by concept index
LABEL_STAGE = register_stage(Stage("02_clip_dissect", "02_clip_dissect.ipynb", version=2,
                                  reads=("clip_dissect.similarity", "clip_dissect.hyperparameters"),
                                  upstream=("01_activation_caching", "01_image_features", "02_text_features")))
# texts per encoder call of artifacts that do not record theirs (written before
# `vlm.batch_size` set it); whole batches of a cached list are reused as they are
TEXT_BATCH = 256
from ..config_values import STORED_TOP  # concepts kept per neuron in the artifact; tables show top_n

TABLES = (Table("clip_dissect", "02_clip_dissect_{}.csv", ("unit", "description", "similarity"),
                 "02"),)
# appended by label_trust.with_trust (that module imports this one, so the names live here)
TRUST_COLUMNS = ("trust_label", "trust_label_agrees", "heldout_r", "heldout_p", "heldout_q",
                 "cosy_auc", "trusted")


def load_concepts_from_config(cfg: Config, name: "str | None" = None) -> ConceptSet:
    """The concept set `clip_dissect.concept_set` (or `name`) with the configured cleaning."""
    s = run_context(cfg).settings.clip_dissect
    clean = s.clean.model_dump(exclude_unset=True) if s.clean else {}
    return load_concept_set(name or s.concept_set, **clean)


def text_feature_output(cfg: Config, concepts: ConceptSet) -> StageOutput:
    params = {**stage_params(cfg, TEXT_STAGE), "clip_dissect.concept_set": concepts.name,
              **vlm_key_params(cfg)}
    return stage_output(TEXT_STAGE, params, inputs={"concepts_sha256": concepts.sha256})


def text_feature_key(cfg: Config, concepts: ConceptSet) -> str:
    return text_feature_output(cfg, concepts).key


def cache_text_features(cfg: Config, concepts: ConceptSet,
                        vlm: "VisionLanguageModel | None" = None, force: bool = False
                        ) -> torch.Tensor:
    """Text features `[M, D]` of the concepts, computed once per (backend, concepts, template),
    encoded `vlm.batch_size` texts at a time (the batch size is recorded, not keyed)."""
    ctx = run_context(cfg)
    store, batch = ctx.store, int(ctx.settings.vlm.batch_size)

    def build(tmp: Path) -> dict:
        nonlocal vlm
        vlm = vlm or load_vlm_from_config(cfg)
        texts = list(concepts)
        reused = _reusable_text_batches(cfg, store, texts, vlm.backend_id, batch)
        rest = vlm.encode_texts(texts[len(reused):], template=ctx.settings.clip_dissect.template,
                                batch_size=batch)
        feats = torch.cat([reused.to(rest), rest]) if len(reused) else rest
        save_tensors({"text_features": feats.float().cpu()}, tmp / "text_features.safetensors")
        atomic_write_text(tmp / "concepts.txt", "\n".join(concepts) + "\n")
        return {"backend_id": vlm.backend_id, "n_concepts": len(concepts),
                "concept_set": concepts.name, "concept_report": concepts.report,
                "text_batch_size": batch}

    art = cached_stage(store, text_feature_output(cfg, concepts), build, force=force)
    return load_file(str(art.file("text_features.safetensors")))["text_features"]


def _reusable_text_batches(cfg: Config, store: ArtifactStore, texts: list[str],
                           backend_id: str, batch: int = TEXT_BATCH) -> torch.Tensor:
    """Rows of an already cached text-feature artifact (same backend and settings) whose concept
    list starts with the same whole batches as `texts`, e.g. words-10k's first 9,984 words
    inside words-20k's features; `[0, D]` when there is none.

    Texts are encoded `batch` at a time from the start of the list and a batch's rows
    depend only on that batch's texts, so reusing whole aligned batches of an artifact encoded
    with the same batch size (`text_batch_size`; `TEXT_BATCH` when it records none) gives the
    same bits as encoding them again.
    """
    settings = {k: v for k, v in {**stage_params(cfg, TEXT_STAGE), **vlm_key_params(cfg)}.items()
                if k != "clip_dissect.concept_set"}
    best, n_best = None, 0
    for art in store.find(TEXT_STAGE.name):
        m = art.manifest
        if (m.get("stage_version") != TEXT_STAGE.version
                or m.get("backend_id") != backend_id
                or int(m.get("text_batch_size", TEXT_BATCH)) != batch
                or {k: v for k, v in m.get("params", {}).items()
                    if k != "clip_dissect.concept_set"} != settings):
            continue
        try:  # a damaged candidate is only a missed saving
            cached = art.verify().file("concepts.txt").read_text(encoding="utf-8").split("\n")[:-1]
        except (DamagedArtifactError, MissingArtifactError, OSError):
            continue
        same = 0
        while (same + batch <= min(len(cached), len(texts))
               and cached[same:same + batch] == texts[same:same + batch]):
            same += batch
        if same > n_best:
            best, n_best = art, same
    if best is None:
        return torch.zeros(0)
    feats = load_file(str(best.file("text_features.safetensors")))["text_features"]
    return feats[:n_best]


def concept_similarity(cfg: Config, probe: ProbeSet, concepts: ConceptSet,
                       vlm: "VisionLanguageModel | None" = None, force: bool = False
                       ) -> Cosines:
    """`P = I @ T.T`, the `[N, M]` image-concept cosines, as its factors
    (`cosines.factorized`): what the similarity functions take, as stage 02 passes it.

    `.columns(m0, m1)` / `.rows(i0, i1)` give blocks; `.dense()` forms P whole (N x M x 4 bytes:
    9 GB at the paper's 113,000 images and 20,000 concepts).
    """
    return factorized(load_image_features(cfg, probe), cache_text_features(cfg, concepts, vlm, force))


def label_output(cfg: Config, layer: str, probe: ProbeSet, concepts: ConceptSet,
                 target=None) -> StageOutput:
    return stage_output(LABEL_STAGE, {**stage_params(cfg, LABEL_STAGE), "layer": layer}, upstream={
        "01_activation_caching": activation_key(cfg, layer, probe, target),
        "01_image_features": image_feature_key(cfg, probe),
        "02_text_features": text_feature_key(cfg, concepts)})


def label_key(cfg: Config, layer: str, probe: ProbeSet, concepts: ConceptSet,
              target=None) -> str:
    return label_output(cfg, layer, probe, concepts, target).key


def dissect_layer(cfg: Config, layer: str, probe: "ProbeSet | None" = None,
                  concepts: "ConceptSet | None" = None, vlm: "VisionLanguageModel | None" = None,
                  force: bool = False, target=None) -> pd.DataFrame:
    """Label every neuron of `layer`: one row per unit with its top concepts and scores.

    Columns: `layer, unit, description, similarity` (the reference's schema) then
    `concept_1, score_1, ...` for the `STORED_TOP` best concepts, best first (fewer when the
    concept set is smaller: `concept_1..M`). `target` is needed only for a target outside the
    registry (a user module).
    """
    ctx = run_context(cfg)
    probe = probe or load_probe_from_config(cfg)
    concepts = concepts or load_concepts_from_config(cfg)

    def build(tmp: Path) -> dict:
        acts = load_activations(cfg, layer, probe=probe, target=target)
        device = ctx.device
        P = factorized(load_image_features(cfg, probe),
                       cache_text_features(cfg, concepts, vlm, force))   # never [N, M] whole
        fn = get_similarity(ctx.settings.clip_dissect.similarity)
        sim = similarity_on_device(fn, P, acts.activations, device=device,
                                   **similarity_hyperparameters(cfg, fn), layer=layer)
        atomic_write_text(tmp / "labels.csv", label_table(sim, concepts, layer).to_csv(index=False))
        return {"layer": layer, "n_neurons": int(sim.shape[0]), "n_concepts": int(sim.shape[1]),
                "concept_set": concepts.name}

    art = cached_stage(ctx.store, label_output(cfg, layer, probe, concepts, target), build,
                       force=force)
    table = pd.read_csv(art.file("labels.csv"), keep_default_na=False)  # "nan", "null" are words
    for col in table.columns:  # scores stay numeric even where one is NaN (written as "")
        if col == "similarity" or col.startswith("score_"):
            table[col] = pd.to_numeric(table[col], errors="coerce")
    return table


def similarity_hyperparameters(cfg: Config, fn) -> dict:
    """`clip_dissect.hyperparameters`, checked against the keywords `fn` accepts."""
    import inspect

    hyper = dict(run_context(cfg).settings.clip_dissect.hyperparameters or {})
    accepted = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == p.KEYWORD_ONLY and p.name not in ("layer", "device", "chunk_size",
                                                                 "num_workers")]
    unknown = sorted(set(hyper) - set(accepted))
    if unknown:
        raise ConfigError(f"clip_dissect.hyperparameters has {', '.join(unknown)}, which "
                          f"{fn.__name__} does not take; it accepts: {', '.join(accepted)}")
    return hyper


def label_table(sim: torch.Tensor, concepts: ConceptSet, layer: str,
                top: int = STORED_TOP) -> pd.DataFrame:
    """Turn `sim [K, M]` into the label table: `concept_j, score_j` for j = 1..min(top, M).

    Best concept first, ties broken by index, NaN ranked last (never a label while any
    concept has a number; `similarity.top_concepts`).
    """
    scores, idx = top_concepts(sim, top)
    top = idx.shape[1]
    rows = {"layer": [layer] * sim.shape[0], "unit": list(range(sim.shape[0])),
            "description": [concepts[int(i)] for i in idx[:, 0]],
            "similarity": scores[:, 0].tolist()}
    for j in range(top):
        rows[f"concept_{j + 1}"] = [concepts[int(i)] for i in idx[:, j]]
        rows[f"score_{j + 1}"] = scores[:, j].tolist()
    return pd.DataFrame(rows)


def write_label_tables(cfg: Config, results: "str | Path", tables: "dict[str, pd.DataFrame]"
                       ) -> dict[str, Path]:
    """Write `02_clip_dissect_<layer>.csv` per layer (top `clip_dissect.top_n` concepts, then
    the trust columns when the tables have them: `label_trust.trust_layers`).

    A concept set smaller than `top_n` gives as many `concept_j, score_j` pairs as it has
    concepts (a 3-concept set: concept_1..3); readers count the columns.
    """
    out, top_n = {}, int(run_context(cfg).settings.clip_dissect.top_n)
    for layer, table in tables.items():
        n = min(top_n, n_concept_columns(table))
        keep = ["layer", "unit", "description", "similarity"]
        keep += [c for j in range(1, n + 1) for c in (f"concept_{j}", f"score_{j}")]
        keep += [c for c in TRUST_COLUMNS if c in table.columns]   # after `label_trust`
        path = TABLES[0].path(results, layer)
        atomic_write_text(path, table[keep].to_csv(index=False))
        out[layer] = path
    return out


def n_concept_columns(table: pd.DataFrame) -> int:
    """How many `concept_j, score_j` pairs (j = 1, 2, ...) a label table holds, in order."""
    n = 0
    while f"concept_{n + 1}" in table.columns and f"score_{n + 1}" in table.columns:
        n += 1
    return n
