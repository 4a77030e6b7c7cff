"""A held-out trust score for every label: stage 02's of every neuron, 06's of DnD's Label 1.

wpmi and soft_wpmi scores are comparable only within one layer, concept set and probe set. The
trust score is comparable across layers and setups, because it asks the same question
everywhere: given the label alone, does the vision-language model predict the neuron's
activations on images the label was not chosen on?

1. The probe set is split once, seeded by `seed`, into `select` and `heldout` parts
   (`trust.heldout` of it held out; `trust_split`).
2. CLIP-Dissect chooses each neuron's `trust_label` again on `select` only (same similarity
   function, same concept set); it usually equals the published label (`trust_label_agrees`).
   DnD's Label 1 is chosen from its D_top images, so its held-out images are the `heldout` part
   less the neuron's D_top images.
3. Per neuron, on the held-out images (`trust_metrics`): `heldout_r`, the simulation Pearson r
   (`sigmoid(a * (cos(image, label) + b))`, (a, b) fitted as stage 08 does, on the select
   images' class labels; a = 1, b = 0 when they have none); `heldout_p`, its permutation p-value
   against `trust.null_concepts` random concepts of the concept set (seeded); `heldout_q`,
   Benjamini-Hochberg over the layer's neurons; `cosy_auc`, CoSy's AUC of the neuron's
   activations on `trust.cosy_images` images of its label (prompt `quality.cosy_prompt`) against
   the held-out images. Offline (`synthesis.name: retrieve`) those images are the retrieval
   pool's closest images to the prompt, never a held-out image, and their activations come from
   the pool's stage-01 cache; other backends synthesise them (stage 05's cache, then stage 06's
   target pass).
4. A label is `trusted` when `heldout_q < trust.alpha`. `alpha` decides no cached output.

Everything is cached per layer under `02_label_trust`, keyed by the trust settings and the keys
of the labels' inputs: changing a trust setting never recomputes a label.

Example:
    >>> trust = layer_trust(cfg, "fc")                                      # doctest: +SKIP
    >>> trust[["unit", "trust_label", "heldout_r", "heldout_p"]].head()     # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import trust_metrics as tm
from .activations import activation_key, load_activations, load_probe_from_config
from .clip_dissect import (cache_text_features, load_concepts_from_config,
                           similarity_hyperparameters, text_feature_key)
from ..concept_sets import ConceptSet
from ..config import Config
from ..context import run_context
from ..cosines import factorized
from .image_features import image_feature_key, load_image_features
from ..probe_set import ProbeSet
from ..similarity import get_similarity, similarity_on_device, top_concepts
from ..stage_cache import Stage, register_stage, cached_stage, stage_output, Table, stage_params
from ..store import atomic_write_text
from .trust_scoring import (CosySource, LazyModel, TrustSettings, fit_simulator,
                            load_configured_vlm, null_concept_ids, score_labels, trust_split)

TABLES = (Table("02_trust_summary.csv", columns=("layer", "n_neurons", "n_trusted"),
                notebooks="02"),)

# a held-out trust score for every label (label_trust): keyed by the trust settings (added
# from `trust:` by TrustSettings.key_params) and by the labels' inputs, so changing a trust
# setting recomputes no label; the synthesis fields decide CoSy's images
TRUST_READS = ("seed", "clip_dissect.similarity", "clip_dissect.hyperparameters",
                "quality.cosy_prompt", "synthesis.name", "synthesis.model", "synthesis.steps",
                "synthesis.scheduler", "synthesis.guidance_scale", "synthesis.height",
                "synthesis.width", "target.name", "target.pooling")

STAGE = register_stage(Stage("02_label_trust", "02_clip_dissect.ipynb", version=1,
                            reads=TRUST_READS,
                            upstream=("01_activation_caching", "01_image_features", "02_text_features")))
# DnD's Label 1 of each neuron, scored as 02_label_trust (its D_top images left out)
DND_STAGE = register_stage(Stage("06_label_trust", "06_selection.ipynb", version=1,
                                reads=TRUST_READS,
                                upstream=("01_activation_caching", "01_image_features", "02_text_features",
                                          "03_top_images", "06_selection")))


@dataclass
class _Inputs:
    """What both trust steps (02's and 06's) read: settings, split, VLM, CoSy's image source."""

    cfg: Config
    layer: str
    settings: TrustSettings
    probe: ProbeSet
    concepts: ConceptSet
    seed: int
    select: list
    held: list
    vlm: LazyModel
    cosy: CosySource
    target: object = None

    @classmethod
    def of(cls, cfg: Config, layer: str, probe, concepts, vlm, target) -> "_Inputs":
        s = TrustSettings.from_config(cfg)
        probe = probe or load_probe_from_config(cfg)
        concepts = concepts or load_concepts_from_config(cfg)
        seed = int(run_context(cfg).settings.seed)
        select, held = trust_split(len(probe), s.heldout, seed)
        if not isinstance(vlm, LazyModel):
            vlm = LazyModel(lambda: load_configured_vlm(cfg), vlm)
        cosy = CosySource(cfg, layer, s, vlm, {probe.items[i].sha256 for i in held}, target)
        return cls(cfg, layer, s, probe, concepts, seed, select, held, vlm, cosy, target)

    def params(self, stage) -> dict:
        return {**stage_params(self.cfg, stage), **self.settings.key_params(), "layer": self.layer}

    def cosy_inputs(self) -> dict:
        """The key input naming CoSy's image source ({} with `trust.cosy: false`)."""
        return {"cosy_images": self.cosy.identity()} if self.settings.cosy else {}

    def tensors(self) -> tuple:
        """(activations `[N, K]`, image features `[N, D]`, the concepts' text features `[M, D]`)
        of the layer's probe set, all cached by stages 01 and 02."""
        return (load_activations(self.cfg, self.layer, probe=self.probe,
                                 target=self.target).activations,
                load_image_features(self.cfg, self.probe),
                cache_text_features(self.cfg, self.concepts, self.vlm.loaded))

    def upstream(self) -> dict:
        return {"01_activation_caching": activation_key(self.cfg, self.layer, self.probe,
                                                        self.target),
                "01_image_features": image_feature_key(self.cfg, self.probe),
                "02_text_features": text_feature_key(self.cfg, self.concepts)}


def layer_trust(cfg: Config, layer: str, probe: "ProbeSet | None" = None,
                concepts: "ConceptSet | None" = None, vlm=None, target=None,
                force: bool = False) -> pd.DataFrame:
    """Trust of every neuron's label in `layer` (see the module docstring), cached.

    Columns: `unit, trust_label, trust_similarity` (its score on `select`), `heldout_r, heldout_p,
    cosy_auc, heldout_q, n_cosy_images`; the
    artifact's manifest records the split sizes, the simulator's (a, b) and the null's size.
    """
    ctx = run_context(cfg)
    c = _Inputs.of(cfg, layer, probe, concepts, vlm, target)
    spec = stage_output(STAGE, c.params(STAGE), upstream=c.upstream(), inputs=c.cosy_inputs())

    def build(tmp: Path) -> dict:
        A, I, T = c.tensors()
        fn = get_similarity(ctx.settings.clip_dissect.similarity)
        sel, h = torch.tensor(c.select), torch.tensor(c.held)
        sim = similarity_on_device(fn, factorized(I[sel], T), A[sel], device=ctx.device,
                                   **similarity_hyperparameters(cfg, fn), layer=layer)
        best, idx = top_concepts(sim, 1)
        best, idx = best[:, 0], idx[:, 0]
        del sim
        calibration = fit_simulator(c.probe, c.select, I, c.vlm)
        null = null_concept_ids(len(c.concepts), c.settings.null_concepts, c.seed)
        labels = [c.concepts[int(i)] for i in idx]
        A_h = A[h]
        per_label = c.cosy.activations(labels) if c.settings.cosy else {}
        scores = score_labels(I[h], A_h, T[idx], T[null], calibration, per_label, labels)
        table = pd.DataFrame({
            "unit": range(A.shape[1]), "trust_label": labels,
            "trust_similarity": best.numpy(),          # its raw score on the select part
            **{k: v.numpy() for k, v in scores.items()},
            "heldout_q": tm.benjamini_hochberg(scores["heldout_p"]).numpy(),
            "n_cosy_images": [per_label[lab].shape[0] if lab in per_label else 0
                              for lab in labels]})
        atomic_write_text(tmp / "trust.csv", table.to_csv(index=False))
        return {"layer": layer, "n_select": len(c.select), "n_heldout": len(c.held),
                "n_null_concepts": int(len(null)), "calibration": calibration}

    art = cached_stage(ctx.store, spec, build, force=force)
    table = pd.read_csv(art.file("trust.csv"), keep_default_na=False,
                        na_values={c: [""] for c in ("trust_similarity", "heldout_r", "heldout_p",
                                                     "heldout_q", "cosy_auc")})
    table.attrs.update(n_heldout=art.manifest["n_heldout"],
                       n_null_concepts=art.manifest["n_null_concepts"],
                       calibration=art.manifest["calibration"])
    return table


def dnd_label_trust(cfg: Config, selection: dict, force: bool = False, target=None,
                    tops: "dict | None" = None) -> "dict[str, pd.DataFrame]":
    """Stage 06's trust step: {layer: `Neuron ID, heldout_r, heldout_p, cosy_auc,
    n_heldout_images`} of each DnD neuron's Label 1 (`selection`: `dnd_selection`'s result;
    `tops`: `dnd_top_images`'s, read when None)."""
    from .dnd import dnd_top_images

    tops = tops or dnd_top_images(cfg, progress=False)
    probe, concepts = load_probe_from_config(cfg), load_concepts_from_config(cfg)
    vlm = LazyModel(lambda: load_configured_vlm(cfg))
    return {layer: dnd_layer_trust(cfg, layer, sel.labels, tops[layer], sel.key, probe=probe,
                                   concepts=concepts, vlm=vlm, target=target, force=force)
            for layer, sel in selection.items()}


def dnd_layer_trust(cfg: Config, layer: str, labels: pd.DataFrame, top, selection_key: str,
                    probe: "ProbeSet | None" = None, concepts: "ConceptSet | None" = None,
                    vlm=None, target=None, force: bool = False) -> pd.DataFrame:
    """heldout_r, heldout_p and cosy_auc of each DnD neuron's `Label 1` (stage 06), cached.

    labels: the layer's `Neuron ID, Label 1, ...` table; top: its `TopImages` (their probe
    images are left out of that neuron's held-out images). The split, simulator, null
    concepts and CoSy images are `layer_trust`'s, so the two methods' scores are comparable.
    Columns: `Neuron ID, heldout_r, heldout_p, cosy_auc, n_heldout_images`.
    """
    ctx = run_context(cfg)
    c = _Inputs.of(cfg, layer, probe, concepts, vlm, target)
    units = [int(u) for u in labels["Neuron ID"]]
    texts = [str(x) for x in labels.get("Label 1", pd.Series([""] * len(units)))]
    spec = stage_output(DND_STAGE, c.params(DND_STAGE), upstream={
        **c.upstream(), "03_top_images": top.key, "06_selection": selection_key},
        inputs={"labels": texts, "units": units, **c.cosy_inputs()})

    def build(tmp: Path) -> dict:
        A, I, T = c.tensors()
        calibration = fit_simulator(c.probe, c.select, I, c.vlm)
        null_text = T[null_concept_ids(len(c.concepts), c.settings.null_concepts, c.seed)]
        named = [t for t in texts if t]
        encoded = dict(zip(named, c.vlm().encode_texts(
            named, template=ctx.settings.clip_dissect.template).float().cpu())) if named else {}
        per_label = c.cosy.activations(texts) if c.settings.cosy else {}
        rows = []
        for unit, text in zip(units, texts):
            seen = set(top.d_top(unit).image_id.astype(int))
            h = torch.tensor([i for i in c.held if i not in seen])
            rec = {"Neuron ID": unit, "heldout_r": np.nan, "heldout_p": np.nan,
                   "cosy_auc": np.nan, "n_heldout_images": len(h)}
            if text and len(h) > 2:
                unit_acts = {text: per_label[text][:, [unit]]} if text in per_label else {}
                got = score_labels(I[h], A[h][:, [unit]], encoded[text][None], null_text,
                                   calibration, unit_acts, [text])
                rec.update({k: float(v[0]) for k, v in got.items()})
            rows.append(rec)
        atomic_write_text(tmp / "trust.csv", pd.DataFrame(rows).to_csv(index=False))
        return {"layer": layer, "calibration": calibration}

    art = cached_stage(ctx.store, spec, build, force=force)
    return pd.read_csv(art.file("trust.csv"), keep_default_na=False,
                       na_values={c: [""] for c in ("heldout_r", "heldout_p", "cosy_auc")})


def with_trust(labels: pd.DataFrame, trust: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """The label table (`dissect_layer`) with the trust columns `clip_dissect.TRUST_COLUMNS` appended."""
    t = trust.set_index("unit").reindex(labels["unit"].to_numpy())
    out = labels.copy()
    out["trust_label"] = t["trust_label"].fillna("").astype(str).to_numpy()
    out["trust_label_agrees"] = (out["trust_label"] == out["description"].astype(str)).to_numpy()
    for c in ("heldout_r", "heldout_p", "heldout_q", "cosy_auc"):
        out[c] = t[c].to_numpy(dtype=float)
    out["trusted"] = (out["heldout_q"] < alpha).to_numpy()     # NaN compares False
    return out


def trust_summary(tables: "dict[str, pd.DataFrame]", alpha: float,
                  trusts: "dict[str, pd.DataFrame] | None" = None) -> pd.DataFrame:
    """`02_trust_summary.csv`: per layer, how many neurons have a trusted label (q < alpha),
    the median heldout_r, the mean cosy_auc and how often the select-only label agrees."""
    rows = []
    for layer, t in tables.items():
        attrs = (trusts or {}).get(layer, pd.DataFrame()).attrs
        rows.append({"layer": layer, "n_neurons": len(t), "n_trusted": int(t["trusted"].sum()),
                     "fraction_trusted": float(t["trusted"].mean()) if len(t) else float("nan"),
                     "alpha": alpha, "median_heldout_r": float(t["heldout_r"].median()),
                     "mean_cosy_auc": float(t["cosy_auc"].mean()),
                     "n_heldout_images": attrs.get("n_heldout"),
                     "n_null_concepts": attrs.get("n_null_concepts"),
                     "label_agreement": float(t["trust_label_agrees"].mean())})
    return pd.DataFrame(rows)


def trust_layers(cfg: Config, tables: "dict[str, pd.DataFrame]", probe: "ProbeSet | None" = None,
                 concepts: "ConceptSet | None" = None, force: bool = False, target=None
                 ) -> "tuple[dict[str, pd.DataFrame], pd.DataFrame]":
    """Stage 02's trust step: every layer's label table with the trust columns, and the
    per-layer summary (`trust_summary`). `tables`: {layer: `dissect_layer`'s table}; `target`
    only for a target outside the registry (as `dissect_layer`)."""
    alpha = TrustSettings.from_config(cfg).alpha
    probe = probe or load_probe_from_config(cfg)
    concepts = concepts or load_concepts_from_config(cfg)
    vlm = LazyModel(lambda: load_configured_vlm(cfg))
    trusts = {layer: layer_trust(cfg, layer, probe=probe, concepts=concepts, vlm=vlm,
                                 target=target, force=force) for layer in tables}
    out = {layer: with_trust(t, trusts[layer], alpha) for layer, t in tables.items()}
    return out, trust_summary(out, alpha, trusts)


def write_trust_summary(results: "str | Path", summary: pd.DataFrame) -> Path:
    path = TABLES[0].path(results)
    atomic_write_text(path, summary.to_csv(index=False))
    return path
