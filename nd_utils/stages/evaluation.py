"""Stage 07: evaluate CLIP-Dissect on the final layer of an ImageNet classifier.

There, neuron k is class k. The protocol follows CLIP-Dissect's own evaluation (METHODS.md
section 2, "Evaluation of the paper"; the reference's similarity-function comparison):
- ground truth of neuron k: line k of the paper's `imagenet_labels` file, the WHOLE line (class
  name with its synonyms, e.g. "tench, Tinca tinca"), embedded as one string. Offline the lines
  come from timm and are checked to be byte-identical to the pinned file
  (`imagenet_label_lines`); when no copy is available the target's short class names are
  used with a warning, and the table's `ground_truth` column says which was used. For a target
  that is not an ImageNet classifier, its own class names are the ground truth;
- predicted label of neuron k: the concept with the highest similarity (`top_concepts`, ties by
  index, NaN last);
- `sentence_cos`: mean over neurons of cos(e(label_k), e(ground truth_k)) with e the sentence
  model, all-mpnet-base-v2 as in the paper (`sentence_models`; all-MiniLM-L6-v2 with a warning
  when mpnet is not installed; the `sentence_model` column says which). `vlm_cos`: the same in
  the vision-language model's text space (with `conse` that is MiniLM, the space in which the
  labels were chosen);
- top-1 / top-5 % when the concept set is the class names (index-aligned: concept k is class k):
  the share of neurons k with k among the 1 / 5 best concepts of row k;
- the constant label "depiction" as a baseline row (it beat every method on text similarity in
  the DnD repository's own notebook).

Example:
    >>> cfg = load_config("offline")                                   # doctest: +SKIP
    >>> ecfg = evaluation_config(cfg)                                  # doctest: +SKIP
    >>> table, extras = evaluate_final_layer(ecfg)                     # doctest: +SKIP
    >>> print(extras["caveat"])                                        # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from .activations import cache_activations, load_activations, load_probe_from_config
from ..backends.configured import load_target_from_config, load_vlm_from_config
from .clip_dissect import cache_text_features, load_concepts_from_config
from .image_features import image_feature_jobs_if_missing, load_image_features
from ..concept_sets import ConceptSet, _sha256_concepts, load_concept_set
from ..imagenet_labels import imagenet_label_lines
from ..paper_concept_files import PAPER_SETS
from ..config import Config
from ..context import run_context
from ..errors import NdUtilsError, OfflineError, ProbeError
from ..backends.sentence_encoders import load_sentence_encoder as sentence_encoder
from ..backends.sentence_models import MINILM
from ..cosines import factorized
from ..similarity import similarity_on_device, top_concepts
from ..notices import record_notice
from ..probes import probe_set_names
from ..store import atomic_write_text
from .evaluation_metrics import _EmbeddingCache, covered_neurons, mean_pair_cosine, topk_accuracy
from ..stage_cache import Table

TABLES = (Table("07_evaluation.csv", notebooks="07"), Table("07_published.csv", notebooks="07"))

BASELINE_LABEL = "depiction"
CLASS_NAME_SETS = ("imagenet_classes", "imagenet_labels", "cifar100_classes")

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


def write_evaluation_tables(results: "str | Path", table: "pd.DataFrame | None" = None,
                            published: "pd.DataFrame | None" = None) -> list[Path]:
    """`07_evaluation.csv` (the table of `evaluate_final_layer`) and `07_published.csv` (the
    paper figures of `published_table`), whichever is given."""
    out = []
    for name, frame in (("07_evaluation.csv", table), ("07_published.csv", published)):
        if frame is not None:
            out.append(atomic_write_text(Path(results) / name, frame.to_csv(index=False)))
    return out


def published_table() -> pd.DataFrame:
    """The published figures this evaluation is compared with, one row per number."""
    return pd.DataFrame(PUBLISHED, columns=["source", "setup", "metric", "value"])


def evaluation_config(cfg: Config) -> Config:
    """The config of the evaluation run: `evaluation.probe_sets`, the final layer only.

    When the evaluation probe cannot be had (e.g. `imagenet-sample-1k` offline, with no copy),
    falls back to `probe.sets` with a warning, so the notebook still runs; the table's `probe`
    column and `evaluation_banner` then say so (`is_fallback(ecfg)`).
    """
    s = run_context(cfg).settings
    over = {"probe.sets": [p.model_dump(exclude_unset=True) for p in s.evaluation.probe_sets],
            "probe.limit": None, "target.layers": [s.evaluation.layer]}
    ecfg = cfg.with_overrides(over)
    try:
        load_probe_from_config(ecfg)
    except (ProbeError, OfflineError) as exc:
        warnings.warn(f"evaluation probe unavailable ({exc}); evaluating on probe.sets instead",
                      stacklevel=2)
        ecfg = cfg.with_overrides({"target.layers": [s.evaluation.layer]})
    return ecfg


def is_fallback(ecfg: Config) -> bool:
    """Whether `ecfg` evaluates on `probe.sets` because `evaluation.probe_sets` was unavailable."""
    s = run_context(ecfg).settings
    return s.probe.sets != s.evaluation.probe_sets


def evaluation_banner(table: pd.DataFrame, wanted: str) -> "str | None":
    """The line shown above the evaluation's tables when they are not on the probe `wanted`
    (the configured `evaluation.probe_sets`) or count fewer neurons than the layer has; None
    when neither. `table` is `07_evaluation.csv` (columns probe, n_images, n_neurons,
    n_classes).

    >>> t = pd.DataFrame({"probe": ["offline-sample"], "n_images": [78], "n_neurons": [43],
    ...                   "n_classes": [1000]})
    >>> print(evaluation_banner(t, "imagenet-sample-1k"))  # doctest: +ELLIPSIS
    Evaluated on offline-sample (78 images), not imagenet-sample-1k, ...
    """
    needed = {"probe", "n_images", "n_neurons", "n_classes"}
    if table is None or table.empty or not needed <= set(table.columns):
        return None
    row = table.iloc[0]
    probe, n_img, n_neu, n_cls = (row["probe"], int(row["n_images"]), int(row["n_neurons"]),
                                  int(row["n_classes"]))
    if probe == wanted and n_neu == n_cls:
        return None
    where = (f"Evaluated on {probe} ({n_img:,} images), not {wanted}, which was unavailable"
             if probe != wanted else f"Evaluated on {probe} ({n_img:,} images)")
    return (f"{where}: top-1, top-5 and the cosines count the {n_neu:,} of {n_cls:,} final-layer "
            f"neurons whose class has an image in it. These numbers are not comparable with the "
            f"published ones (ImageNet val, 50,000 images). To evaluate on {wanted}, allow its "
            f"download or give its folder (see the README, 'Two commands').")


def _with_quality_layers(ecfg: Config) -> Config:
    """`ecfg` caching the DnD layers too when stage 08 reads the same probe set, so one pass
    over its images serves both stages (08 then finds its held-out activations cached)."""
    s = run_context(ecfg).settings
    layers = list(s.target.layers)
    if s.quality.probe_sets == s.probe.sets:
        layers += [layer for layer in s.dnd.layers if layer not in layers]
    return ecfg.with_overrides({"target.layers": layers})


def load_sentence_encoder(name: str, device="cpu"):
    """The evaluation's sentence model, offline (see `sentence_encoders.load_sentence_encoder`),
    on `device` (the evaluation passes the configured one).

    Returns (texts -> embeddings `[M, D]` on the CPU, name actually used): all-mpnet-base-v2
    from its verified PyPI parts, or all-MiniLM-L6-v2 with a warning when those are not installed.
    """
    return sentence_encoder(name, device=device, batch_size=128)


def _imagenet_short_names() -> list[str]:
    return list(load_concept_set("imagenet_classes").concepts)


def ground_truth(class_names: Sequence[str], *, allow_download: bool = True
                 ) -> tuple[list[str], dict]:
    """Ground truth of neuron k (item k) for a classifier's final layer, and what it is.

    An ImageNet-1k classifier (its class names are torchvision's 1,000, in order) gets the
    paper's `imagenet_labels` lines, whole; when no verified copy is available, its short class
    names with a warning. Any other classifier gets its own class names. The record holds
    `ground_truth` (the table's column), `source` and, for a fallback, `why`.

    Example:
        >>> lines, info = ground_truth(_imagenet_short_names())          # doctest: +SKIP
        >>> lines[0], info["ground_truth"]                                 # doctest: +SKIP
        ('tench, Tinca tinca', 'imagenet_labels')
    """
    names = list(class_names)
    if len(names) != 1000 or names != _imagenet_short_names():
        return names, {"ground_truth": "target class names", "source": "target.class_names"}
    try:
        lines, source = imagenet_label_lines(allow_download=allow_download)
    except NdUtilsError as exc:
        warnings.warn(f"ground truth: the paper's imagenet_labels lines are unavailable ({exc}). "
                      f"FALLING BACK to torchvision's short class names (e.g. 'tench' instead of "
                      f"'tench, Tinca tinca'): the cosines are not the paper's protocol and are "
                      f"not comparable with its numbers", stacklevel=2)
        return names, {"ground_truth": "imagenet_classes (fallback)",
                       "source": "torchvision ImageNet class names", "why": str(exc)}
    return lines, {"ground_truth": "imagenet_labels", "source": source,
                   "sha256": PAPER_SETS["imagenet_labels"][0]}


def _concepts_for(ecfg: Config, set_name: str, gt_lines: list[str], gt_info: dict) -> ConceptSet:
    """The concept set; `imagenet_labels` uses a local copy, else the verified offline lines
    (identical to the paper file), and only then the download."""
    if set_name == "imagenet_labels" and gt_info["ground_truth"] == "imagenet_labels":
        clean = run_context(ecfg).settings.clip_dissect.clean
        clean = clean.model_dump(exclude_unset=True) if clean else {}
        try:
            return load_concept_set(set_name, allow_download=False, **clean)
        except NdUtilsError:
            return ConceptSet("imagenet_labels", tuple(gt_lines), gt_info["source"],
                              _sha256_concepts(gt_lines),
                              {"n_concepts": len(gt_lines), "index_aligned": True,
                               "file_sha256": gt_info["sha256"], "offline_copy": True})
    return load_concepts_from_config(ecfg, set_name)


def reading_notes(vlm_name: str, sentence_model: str, gt_info: dict) -> str:
    """How to read this run's table: the caveats that apply to it (printed by notebook 07)."""
    notes = []
    if vlm_name == "conse":
        notes.append(
            "vlm = conse: each probe image is embedded from EfficientNet-Lite2's ImageNet class "
            "probabilities (MiniLM embeddings of its top-10 class names). The rows whose concept "
            "set is the class names (imagenet_classes, imagenet_labels) therefore largely "
            "measure agreement between two ImageNet classifiers (does the target's neuron k fire "
            "on the images Lite2 calls class k?), not a vision-language match: their top-1/top-5 "
            "and cosines are high by construction and are not comparable with the paper's CLIP "
            "numbers. The non-circular reading is the word-list rows (words-10k, words-20k): the "
            "label is a word from a general list, never the class-name string itself, and it is "
            "scored in a different model's space (sentence_cos) against the whole class line. "
            "They still inherit ImageNet supervision through ConSE's image features, so they are "
            "not a CLIP measurement either. vlm_cos is MiniLM here, the space the labels were "
            "chosen in: read sentence_cos.")
    if sentence_model == MINILM:
        notes.append("sentence model = all-MiniLM-L6-v2 (fallback): the paper's sentence cosines "
                     "use all-mpnet-base-v2; these are not comparable with them.")
    if gt_info["ground_truth"] != "imagenet_labels":
        notes.append(f"ground truth = {gt_info['ground_truth']} ({gt_info['source']}), not the "
                     f"paper's imagenet_labels lines.")
    return "\n".join(notes)


def cache_evaluation_inputs(ecfg: Config, concept_sets: "list[str] | None" = None, *,
                            activations: bool = True, texts: bool = True,
                            progress: bool = True) -> None:
    """Compute and cache what `evaluate_final_layer` reads, without scoring anything.

    `activations`: the final layer's activations and the backend's image features of the probe;
    `texts`: the backend's text features of each concept set (default: evaluation.concept_sets).
    Cached inputs are not recomputed and models load only when something is missing, so a
    notebook can run the slow steps in separate cells (each within its own time limit).
    """
    target = load_target_from_config(ecfg, device="cpu")
    if activations:
        probe = load_probe_from_config(ecfg)
        jobs = image_feature_jobs_if_missing(ecfg, probe)
        cache_activations(_with_quality_layers(ecfg), target=target, probe=probe,
                          extra_jobs=jobs, progress=progress)
    if texts:
        truths, gt_info = ground_truth(target.class_names or [])
        vlm = None
        for set_name in concept_sets or run_context(ecfg).settings.evaluation.concept_sets:
            concepts = _concepts_for(ecfg, set_name, truths, gt_info)
            if vlm is None and not _text_features_cached(ecfg, concepts):
                vlm = load_vlm_from_config(ecfg)
            cache_text_features(ecfg, concepts, vlm)


def _text_features_cached(ecfg: Config, concepts: ConceptSet) -> bool:
    from .clip_dissect import TEXT_STAGE, text_feature_key
    return run_context(ecfg).store.exists(TEXT_STAGE.name, text_feature_key(ecfg, concepts))


def evaluate_final_layer(ecfg: Config, similarities: "list[str] | None" = None,
                         concept_sets: "list[str] | None" = None, progress: bool = True
                         ) -> tuple[pd.DataFrame, dict]:
    """Score every (concept set, similarity function) on the final layer; returns (table, extras).

    Table columns: concept_set, similarity, n_concepts, top1, top5 (class-name sets only),
    vlm_cos, sentence_cos, sentence_model, ground_truth, probe, n_images, n_neurons (the neurons
    counted: those whose class has an image in the probe), n_classes; plus one
    constant-`depiction` baseline row. `extras`: predicted labels per setting, ground-truth
    lines and their record, the models used, the protocol, the caveats (`caveat`) that apply
    to this run and `banner` (`evaluation_banner`'s line, or None).
    """
    s = run_context(ecfg).settings
    layer = s.evaluation.layer
    probe = load_probe_from_config(ecfg)
    target = load_target_from_config(ecfg, device="cpu")
    if not target.class_names:
        raise NdUtilsError(f"target {target.name!r} has no class names: the final-layer "
                           f"evaluation needs a classifier whose neuron k is class k")
    vlm = load_vlm_from_config(ecfg)  # once, for image features, text features and cosines
    jobs = image_feature_jobs_if_missing(ecfg, probe, vlm)
    cache_activations(_with_quality_layers(ecfg), target=target, probe=probe, extra_jobs=jobs,
                      progress=progress)
    acts = load_activations(ecfg, layer, probe=probe)
    if acts.n_neurons != len(target.class_names):
        raise NdUtilsError(f"layer {layer!r} has {acts.n_neurons} neurons but the target has "
                           f"{len(target.class_names)} classes: set evaluation.layer to the "
                           f"final (logit) layer")
    truths, gt_info = ground_truth(target.class_names)
    image_features = load_image_features(ecfg, probe)
    device = run_context(ecfg).device
    sentence, sentence_name = load_sentence_encoder(s.evaluation.sentence_model, device)
    text_batch = int(s.vlm.batch_size)
    vlm_enc = _EmbeddingCache(lambda texts: vlm.encode_texts(list(texts), batch_size=text_batch))
    st_enc = _EmbeddingCache(sentence)
    K = len(truths)
    covered = covered_neurons(probe, K)
    keep = covered.tolist()
    truths_kept = [truths[i] for i in keep]
    common = {"sentence_model": sentence_name, "ground_truth": gt_info["ground_truth"],
              "probe": probe.name, "n_images": len(probe), "n_neurons": len(keep),
              "n_classes": K}
    rows, preds = [], {}
    for set_name in concept_sets or s.evaluation.concept_sets:
        concepts = _concepts_for(ecfg, set_name, truths, gt_info)
        P = factorized(image_features, cache_text_features(ecfg, concepts, vlm))
        aligned = set_name in CLASS_NAME_SETS and len(concepts) == len(truths)
        for fn_name in similarities or s.evaluation.similarities:
            sim = similarity_on_device(fn_name, P, acts.activations, device=device, layer=layer)
            labels = [concepts[int(i)] for i in top_concepts(sim, 1)[1][:, 0]]
            preds[(set_name, fn_name)] = labels
            row = {"concept_set": set_name, "similarity": fn_name, "n_concepts": len(concepts)}
            if aligned:
                row["top1"] = topk_accuracy(sim, 1, covered)
                row["top5"] = topk_accuracy(sim, 5, covered)
            kept = [labels[i] for i in keep]
            row["vlm_cos"] = mean_pair_cosine(vlm_enc, kept, truths_kept)
            row["sentence_cos"] = mean_pair_cosine(st_enc, kept, truths_kept)
            rows.append({**row, **common})
    base = [BASELINE_LABEL] * len(keep)
    rows.append({"concept_set": "(none)", "similarity": f"constant '{BASELINE_LABEL}'",
                 "n_concepts": 1, "vlm_cos": mean_pair_cosine(vlm_enc, base, truths_kept),
                 "sentence_cos": mean_pair_cosine(st_enc, base, truths_kept), **common})
    table = pd.DataFrame(rows)
    for col in ("top1", "top5"):  # present (NaN) even when no class-name set was evaluated
        if col not in table:
            table.insert(3 if col == "top1" else 4, col, float("nan"))
    extras = {"predictions": preds, "sentence_model": sentence_name, "vlm": s.vlm.name,
              "probe": probe.describe(), "target": target.name,
              "class_names": list(target.class_names), "ground_truth_lines": truths,
              "ground_truth": gt_info, "protocol": PROTOCOL,
              "caveat": reading_notes(s.vlm.name, sentence_name, gt_info),
              "banner": evaluation_banner(table, probe_set_names(
                  [p.model_dump() for p in s.evaluation.probe_sets]))}
    if extras["banner"]:
        warnings.warn(extras["banner"], stacklevel=2)
        record_notice("evaluation_probe", extras["banner"], stage="07")
    return table, extras


PROTOCOL = (
    "Protocol (CLIP-Dissect's evaluation): neuron k of the final layer is class k; its label is "
    "the concept with the highest similarity. Ground truth = line k of the paper's "
    "imagenet_labels file, the whole line (e.g. 'tench, Tinca tinca'). sentence_cos = mean over "
    "neurons of the cosine between the sentence embeddings (all-mpnet-base-v2) of the label and "
    "of that line; vlm_cos = the same in the vision-language model's text space. top-1/top-5 = "
    "% of neurons whose own class is among the 1/5 best concepts, defined only when the concept "
    "set is the class list (concept k = class k).")
