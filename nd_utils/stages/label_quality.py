"""Stage 08: how good are the labels? CoSy, simulation and sanity checks, CLIP-Dissect vs DnD.

The quality probe (`quality.probe_sets`, one set) is split once, seeded by `seed`, into `select`
/ `pool` / `calibrate` / `test` parts (`probe_split`; the ids are saved in `08_split.csv`):

1. the labels judged are the run's own (stages 02 and 06) when none of the images they were
   chosen on (the run's probe, and with `retrieve` its retrieval pool) is a `test` or
   `calibrate` image, as in the offline profile (probe `offline-sample`, pool the `pool` part);
   otherwise both methods choose them again on `select` only: CLIP-Dissect over the select
   images, DnD with its D_top drawn from them (and, offline, its concept images retrieved from
   `pool`). `labelling_config` decides, by image content (sha256);
2. for each evaluated neuron (`dnd.neurons` of `dnd.layers`) and each label source (the two
   methods, and the sanity labels: the true class on a classifier's final layer, each method's
   labels shuffled across neurons, a random concept of the concept set, the constant
   "depiction"), on the held-out `test` images:
   - CoSy (NeurIPS 2024): the neuron's activations on images of the label (`a_1`: the synthesis
     backend with CoSy's prompt; offline `retrieve` from `pool`) against those on the test images
     (`a_0`): AUC, MAD, AUPRC and a one-sided Mann-Whitney p-value (`label_metrics.cosy_scores`);
   - simulation (Linear Explanations, ICML 2024): activations predicted from the label alone,
     `sigmoid(a * (cos(image, label) + b))` in the vision-language model's space, with (a, b)
     fitted on the `calibrate` images against their own class labels; Pearson r with the real
     activations on `test`;
3. means with bootstrap intervals over neurons, a paired CLIP-Dissect vs DnD comparison, and the
   sanity ordering true > method > shuffled > constant (NeuronEval, ICML 2025) per metric.

Example:
    >>> result = evaluate_label_quality(load_config("offline"))       # doctest: +SKIP
    >>> result.comparison[["layer", "metric", "clip_dissect", "dnd", "p_wilcoxon"]]  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import label_metrics as lm
from .activations import cache_activations, load_activations, load_probe_from_config
from .image_features import cfg_for_root
from ..backends.configured import load_target_from_config, load_vlm_from_config
from .clip_dissect import dissect_layer, load_concepts_from_config
from .image_features import image_feature_jobs_if_missing, load_image_features
from ..config import Config
from ..context import run_context
from .dnd import dnd_selection
from ..errors import ConfigError, NdUtilsError, OfflineError, ProbeError
from ..probe_split import split_part, split_table
from ..probes import load_probes
from ..probe_set import ProbeSet
from ..probes import probe_set_names
from ..machine import seed_everything
from .selection import label_image_activations
from ..stage_cache import Stage, register_stage, cached_stage, stage_output, Table, stage_params
from ..notices import record_notice
from ..store import atomic_write_text
from .synthesis import load_pool
from .quality_statistics import (CONSTANT, METHODS, METRICS, RANDOM, TRUE, compare_methods,
                                 sanity_checks, summarise_quality)

TABLES = (Table("08_label_quality.csv",
                columns=("layer", "unit", "source", "auc", "mad", "sim_r"), notebooks="08"),
          Table("08_quality_summary.csv", columns=("layer", "source", "metric", "mean"),
                notebooks="08"),
          Table("08_method_comparison.csv", columns=("layer", "metric", "clip_dissect", "dnd"),
                notebooks="08"),
          Table("08_sanity_checks.csv", columns=("layer", "metric", "method", "ok"),
                notebooks="08"))

# label quality: the labels judged (see labelling_config) are an input, hashed with the
# settings that decide the CoSy images, the simulator and the held-out activations
STAGE = register_stage(Stage("08_label_quality", "08_label_quality.ipynb", version=1,
                            reads=("quality.probe_sets", "quality.split", "quality.cosy_prompt",
                                   "quality.cosy_images", "seed", "target.name", "target.pooling", "vlm.name",
                                   "synthesis.name", "synthesis.model", "synthesis.steps", "synthesis.scheduler",
                                   "synthesis.guidance_scale", "synthesis.height", "synthesis.width")))
PARTS = ("select", "pool", "calibrate", "test")


def quality_config(cfg: Config) -> Config:
    """Stage 08's config: probe = the `select` part of `quality.probe_sets`, the retrieval pool
    = its `pool` part, layers = `dnd.layers` (the labels are chosen under it when the run's own
    are not held out, see `labelling_config`).

    Falls back to `probe.sets` (with a warning) when the quality probe is unavailable, e.g.
    `imagenet-sample-1k` offline with no copy; `QualityResult.note` then says so.
    """
    s = run_context(cfg).settings
    specs = [p.model_dump(exclude_unset=True) for p in s.quality.probe_sets]
    if len(specs) != 1:
        raise ConfigError(f"quality.probe_sets must name one probe set (it is split into "
                          f"{', '.join(PARTS)}), got {len(specs)}")
    try:
        load_probes([specs[0]])
    except (ProbeError, OfflineError) as exc:
        if len(s.probe.sets) != 1:
            raise
        warnings.warn(f"quality probe unavailable ({exc}); splitting probe.sets instead",
                      stacklevel=2)
        specs = [p.model_dump(exclude_unset=True) for p in s.probe.sets]
    # key material (probe.sets of the parts): the fractions as written, not as parsed (0 != 0.0)
    split = {"fractions": dict(cfg.select(["quality.split"])["quality.split"]),
             "seed": int(s.seed)}
    base = {k: v for k, v in specs[0].items() if k != "split"}
    return cfg.with_overrides({
        "probe.sets": [{**base, "split": {"part": "select", **split}}], "probe.limit": None,
        "synthesis.pool": [{**base, "split": {"part": "pool", **split}}],
        "target.layers": list(s.dnd.layers)})


def quality_parts(qcfg: Config) -> dict[str, ProbeSet]:
    """{part: ProbeSet} of the quality probe, each a view of the whole set's caches."""
    spec = run_context(qcfg).settings.probe.sets[0].model_dump(exclude_unset=True)
    whole = load_probes([{k: v for k, v in spec.items() if k != "split"}])  # read once
    return {part: split_part(whole, {**spec["split"], "part": part}) for part in PARTS}


def cache_quality_inputs(qcfg: Config, parts: "dict[str, ProbeSet] | None" = None,
                         progress: bool = True) -> None:
    """Activations of `dnd.layers` and image features of the whole quality probe, one pass
    (the final layer's are shared with stage 07 when both use the same probe)."""
    test = (parts or quality_parts(qcfg))["test"]
    wcfg = cfg_for_root(qcfg, test)
    cache_activations(wcfg, probe=test.root,
                      extra_jobs=image_feature_jobs_if_missing(wcfg, test.root),
                      progress=progress)


def labelling_config(cfg: Config, qcfg: Config, parts: dict[str, ProbeSet]
                     ) -> tuple[Config, str]:
    """The config whose labels stage 08 judges: `(cfg, "run")` when the run's labels are held
    out, else `(qcfg, "select")` (labels chosen again on the select part).

    Held out means that no image the run chose its labels on (its probe set and, with the
    `retrieve` backend, its retrieval pool; compared by sha256) is a `test` or `calibrate` image,
    so judging the run's own labels costs nothing and measures what the run produced.
    """
    judged = {it.sha256 for part in ("test", "calibrate") for it in parts[part].items}
    try:
        seen = [load_probe_from_config(cfg)]
        if run_context(cfg).settings.synthesis.name == "retrieve":
            with warnings.catch_warnings():  # stage 05 already warned about a fallback pool
                warnings.simplefilter("ignore")
                seen.append(load_pool(cfg)[0])
    except ProbeError:
        return qcfg, "select"
    if any(it.sha256 in judged for probe in seen for it in probe.items):
        return qcfg, "select"
    return cfg, "run"


def method_labels(lcfg: Config, progress: bool = True, target=None, vlm=None) -> pd.DataFrame:
    """`layer, unit, source, label`: CLIP-Dissect's and DnD's label of every DnD neuron under
    `lcfg` (see `labelling_config`; computed here when not cached)."""
    rows = []
    selection = dnd_selection(lcfg, progress=progress, target=target, vlm=vlm)
    for layer, sel in selection.items():
        cd = dissect_layer(lcfg, layer).set_index("unit")["description"]
        for _, r in sel.labels.iterrows():
            unit = int(r["Neuron ID"])
            rows.append({"layer": layer, "unit": unit, "source": "clip_dissect",
                         "label": str(cd[unit])})
            rows.append({"layer": layer, "unit": unit, "source": "dnd",
                         "label": str(r.get("Label 1", "") or "")})
    return pd.DataFrame(rows, columns=["layer", "unit", "source", "label"])


def sanity_labels(qcfg: Config, labels: pd.DataFrame, class_names: "list[str] | None",
                  n_units: "dict[str, int]") -> pd.DataFrame:
    """Add the sanity labels to the methods' rows (see the module docstring).

    Shuffles are derangements over all evaluated neurons (seeded), so no neuron keeps its own
    label; the true class is given on `evaluation.layer` when the target's class list matches
    that layer's width.
    """
    s = run_context(qcfg).settings
    rng = np.random.default_rng(int(s.seed))
    out = [labels]
    for method in METHODS:
        rows = labels[labels.source == method].reset_index(drop=True)
        if len(rows) >= 2:
            perm = _derangement(len(rows), rng)
            out.append(rows.assign(source=f"shuffled {method}",
                                   label=rows.label.to_numpy()[perm]))
    units = labels[["layer", "unit"]].drop_duplicates().reset_index(drop=True)
    words = list(load_concepts_from_config(qcfg))
    out.append(units.assign(source=RANDOM, label=[words[int(i)] for i in
                                                  rng.integers(0, len(words), len(units))]))
    out.append(units.assign(source=CONSTANT, label="depiction"))
    final = s.evaluation.layer
    if class_names and n_units.get(final) == len(class_names):
        fc = units[units.layer == final]
        out.append(fc.assign(source=TRUE, label=[class_names[u] for u in fc.unit]))
    return pd.concat(out, ignore_index=True)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:  # about e tries on average
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def calibrate_simulator(calib: ProbeSet, feats: torch.Tensor, vlm,
                        batch_size: int = 256) -> dict:
    """Fit the simulator's `(a, b)` on labelled calibration images (`label_metrics`).

    Concepts are the distinct labels of the whole probe set; image i is a positive of concept j
    when its label is j, as Linear Explanations calibrates on ImageNet class labels.
    """
    labels = [lab for lab in calib.root.labels if lab]
    concepts = sorted(set(labels))
    have = [i for i, lab in enumerate(calib.labels) if lab]
    if len(concepts) < 2 or len(have) < 2:
        raise ConfigError(f"simulation: the calibration images of {calib.root.name!r} need class "
                          f"labels (found {len(have)} labelled, {len(concepts)} classes)")
    text = vlm.encode_texts(concepts, batch_size=batch_size).float().cpu()
    cos = (feats[have].float() @ text.T).numpy()
    a, b = lm.fit_simulator_on_classes(cos, [calib.labels[i] for i in have], concepts)
    return {"a": a, "b": b, "n_images": len(have), "n_concepts": len(concepts)}


def score_labels(qcfg: Config, labels: pd.DataFrame, parts: dict[str, ProbeSet], vlm, target,
                 calibration: dict, progress: bool = True) -> pd.DataFrame:
    """Every metric for every (layer, unit, source) row of `labels` on the test part."""
    wanted = sorted({lab for lab in labels.label if lab})
    layers = sorted(set(labels.layer))
    qs = run_context(qcfg).settings
    cosy = label_image_activations(qcfg, wanted, layers, target, vlm,
                                   qs.quality.cosy_prompt, qs.quality.cosy_images,
                                   progress=progress)
    test = parts["test"]
    acts = {layer: load_activations(qcfg, layer, probe=test).activations for layer in layers}
    feats = load_image_features(qcfg, test).float()
    text = dict(zip(wanted, vlm.encode_texts(wanted, batch_size=int(qs.vlm.batch_size)
                                             ).float().cpu())) if wanted else {}
    out = []
    for r in labels.itertuples(index=False):
        a0 = acts[r.layer][:, r.unit].numpy()
        rec = {"layer": r.layer, "unit": r.unit, "source": r.source, "label": r.label,
               "auc": np.nan, "mad": np.nan, "auprc": np.nan, "p_value": np.nan,
               "sim_r": np.nan, "n_concept_images": 0, "n_test": len(a0)}
        if r.label and r.label in cosy:
            a1 = cosy[r.label][r.layer][:, r.unit].numpy()
            s = lm.cosy_scores(a0, a1)
            rec.update(auc=s["auc"], mad=s["mad"], auprc=s["auprc"], p_value=s["p_value"],
                       n_concept_images=len(a1))
        if r.label and calibration:
            pred = lm.simulate_activations((feats @ text[r.label]).numpy(), calibration["a"],
                                           calibration["b"])
            rec["sim_r"] = lm.pearson(pred, a0)
        out.append(rec)
    return pd.DataFrame(out)


@dataclass
class QualityResult:
    table: pd.DataFrame        # one row per (layer, unit, source): label and metrics
    summary: pd.DataFrame
    comparison: pd.DataFrame
    sanity: pd.DataFrame
    split: pd.DataFrame        # id, part, sha256, label, path
    calibration: dict
    labels_from: str           # "run": the run's own labels; "select": chosen again on select
    key: str
    manifest: dict
    note: str                  # which probe and how many held-out images (`quality_note`)


def evaluate_label_quality(cfg: Config, force: bool = False, progress: bool = True
                           ) -> QualityResult:
    """Stage 08 end to end (see the module docstring); every step is cached by content."""
    ctx = run_context(cfg)
    s = ctx.settings
    seed_everything(int(s.seed))
    qcfg = quality_config(cfg)
    qs = run_context(qcfg).settings
    parts = quality_parts(qcfg)
    cache_quality_inputs(qcfg, parts, progress=progress)
    lcfg, labels_from = labelling_config(cfg, qcfg, parts)
    target = load_target_from_config(cfg)
    vlm = load_vlm_from_config(qcfg)
    labels = method_labels(lcfg, progress=progress, target=target, vlm=vlm)
    n_units = {layer: load_activations(qcfg, layer, probe=parts["test"]).n_neurons
               for layer in set(labels.layer)}
    labels = sanity_labels(qcfg, labels, target.class_names, n_units)
    whole = parts["test"].root
    spec = stage_output(STAGE, stage_params(cfg, STAGE), inputs={
        "probe_fingerprint": whole.fingerprint, "vlm": vlm.backend_id,
        "weights": target.weights_id, "labels_sha256": _sha(labels.to_csv(index=False))})

    def build(tmp: Path) -> dict:
        try:
            calibration = calibrate_simulator(parts["calibrate"], load_image_features(
                qcfg, parts["calibrate"]), vlm, batch_size=int(qs.vlm.batch_size))
        except ConfigError as exc:  # no class labels: CoSy still runs, simulation is NaN
            warnings.warn(str(exc), stacklevel=4)  # the caller of evaluate_label_quality
            calibration = {}
        table = score_labels(qcfg, labels, parts, vlm, target, calibration, progress)
        split = split_table(whole, s.quality.split, int(s.seed))
        atomic_write_text(tmp / "label_quality.csv", table.to_csv(index=False))
        atomic_write_text(tmp / "split.csv", split.to_csv(index=False))
        atomic_write_text(tmp / "calibration.json", json.dumps(calibration, indent=1))
        return {"calibration": calibration}

    art = cached_stage(ctx.store, spec, build, force=force, extra={
        "labels_from": labels_from, "parts": {p: len(s) for p, s in parts.items()}})
    table = pd.read_csv(art.file("label_quality.csv"), keep_default_na=False,
                        na_values={m: [""] for m in (*METRICS, "p_value")})
    n_boot = int(s.quality.bootstrap)
    summary = summarise_quality(table, n_boot, int(s.seed))
    probe_name = whole.name
    summary.insert(0, "probe", probe_name)
    summary.insert(1, "n_images", len(whole))
    summary.insert(2, "n_test_images", len(parts["test"]))
    wanted = probe_set_names([p.model_dump() for p in s.quality.probe_sets])
    note = quality_note(probe_name, wanted, len(parts["test"]), len(whole))
    if probe_name != wanted:
        warnings.warn(note, stacklevel=2)
        record_notice("quality_probe", note, stage="08")
    return QualityResult(table, summary, compare_methods(table, n_boot, int(s.seed)),
                         sanity_checks(summary),
                         pd.read_csv(art.file("split.csv"), keep_default_na=False),
                         json.loads(art.file("calibration.json").read_text()), labels_from,
                         art.key, art.manifest, note)


def quality_note(probe: str, wanted: str, n_test: int, n_images: int) -> str:
    """What stage 08 judged on, and, when `probe` is not the configured `wanted`, that its
    numbers are not comparable with a run on `wanted`.

    >>> quality_note("imagenet-sample-1k", "imagenet-sample-1k", 100, 1000)
    'Judged on 100 held-out test images of imagenet-sample-1k (1,000 images).'
    """
    line = f"Judged on {n_test:,} held-out test images of {probe} ({n_images:,} images)."
    if probe != wanted:
        line += (f" {wanted} was unavailable, so these scores are not comparable with a run on "
                 f"it; to use it, allow its download or give its folder (see the README, "
                 f"'Two commands').")
    return line


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_quality_tables(results: "str | Path", result: QualityResult) -> dict[str, Path]:
    """`08_label_quality.csv`, `08_quality_summary.csv`, `08_method_comparison.csv`,
    `08_sanity_checks.csv` and `08_split.csv` in the run's results folder."""
    out = {}
    for name, df in [("08_label_quality", result.table), ("08_quality_summary", result.summary),
                     ("08_method_comparison", result.comparison),
                     ("08_sanity_checks", result.sanity), ("08_split", result.split)]:
        out[name] = Path(results) / f"{name}.csv"
        atomic_write_text(out[name], df.to_csv(index=False))
    return out


def asks_language_model(cfg, stages: set) -> "str | None":
    """Why stage 08 would ask `llm.*` for candidate concepts, or None when it would not.

    It does when it chooses the labels again on its select part (`labelling_config` says
    "select": the run's own labels saw held-out images), and when it judges the run's own labels
    but stage 04 is neither in this run nor in the store, so stage 08 computes it itself. When
    the quality probe cannot be read, it is taken to re-choose (as `labelling_config` does).
    Re-chosen labels count as asking even when an earlier stage 08 stored their concepts (their
    key needs the target's activations); `llm.mode: replay` runs those without a key.
    Costs one scan of the probe sets (cached), and only runs when a missing key is at stake.
    """
    import warnings

    try:
        with warnings.catch_warnings():  # stage 08 itself warns about a fallback probe
            warnings.simplefilter("ignore")
            qcfg = quality_config(cfg)
            _, labels_from = labelling_config(cfg, qcfg, quality_parts(qcfg))
    except NdUtilsError:
        labels_from = "select"
    if labels_from == "select":
        return "08 chooses the DnD labels again on its select part"
    if "04" not in stages and not run_context(cfg).store.find("04_concepts"):
        return "08 computes the missing stage 04 for the run's own labels"
    return None
