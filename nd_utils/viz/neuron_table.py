"""The neuron table of a run folder: one row per (layer, unit) assembled from its result tables.

`NeuronTableMixin` gives `RunView` (`run_folders`) its `neuron_table()`: the labels and scores of
stages 02 and 06, the label-quality metrics of stage 08 and the held-out trust scores, joined by
(layer, unit).
"""
from __future__ import annotations

import pandas as pd

RANK_REORDER_FLOOR = -3.4028234663852886e38  # = similarity_formulas'; no torch import here

# neuron_table() prefix -> `source` of 08_label_quality.csv; metrics copied per method
QUALITY_SOURCES = {"cd": "clip_dissect", "dnd": "dnd"}
QUALITY_METRICS = ("auc", "mad", "sim_r")
# neuron_table() column -> column of the 02 / 06 table holding the label's held-out trust
# score (stage 02's issue-23 columns; older runs lack them and get NaN / False / "")
CD_TRUST = {"cd_heldout_r": "heldout_r", "cd_heldout_p": "heldout_p",
            "cd_heldout_q": "heldout_q", "cd_cosy_auc": "cosy_auc"}
DND_TRUST = {"dnd_heldout_r": "heldout_r", "dnd_heldout_p": "heldout_p",
             "dnd_cosy_auc": "cosy_auc"}
TRUST_COLUMNS = (*CD_TRUST, "cd_trusted", "cd_trust_label", *DND_TRUST)


class NeuronTableMixin:
    """`neuron_table()` for a RunView (it reads the tables through the view's accessors)."""

    def neuron_table(self) -> pd.DataFrame:
        """One row per (layer, unit): CLIP-Dissect label/score/concepts and DnD labels/score.

        Then the label-quality metrics of stage 08 per method: cd_auc, cd_mad, cd_sim_r,
        dnd_auc, dnd_mad, dnd_sim_r (floats; NaN when the run has no such row), and the labels
        they score, cd_quality_label and dnd_quality_label (the run's own labels when they are held
        out, else chosen again on stage 08's select split and then can differ from cd_label /
        dnd_labels).

        Last, the held-out trust score stage 02 / 06 wrote beside each label: cd_heldout_r,
        cd_heldout_p, cd_heldout_q (BH-adjusted within the layer), cd_cosy_auc, cd_trusted
        (heldout_q < trust.alpha) and cd_trust_label (the label chosen on the probe's select
        half, which these scores judge; usually cd_label), then dnd_heldout_r, dnd_heldout_p,
        dnd_cosy_auc of DnD's Label 1. Runs older than these columns get NaN, False and "".
        """
        if "neuron_table" in self._cache:
            return self._cache["neuron_table"].copy()
        parts = []
        for layer in self.layers:
            cd, dnd, cand = self.clip_dissect(layer), self.dnd(layer), self.dnd_candidates(layer)
            frames = []
            if cd is not None:
                n = 0  # concept_1, score_1, ... as many as the table has (top_n, or fewer)
                while f"concept_{n + 1}" in cd.columns and f"score_{n + 1}" in cd.columns:
                    n += 1
                names = cd[[f"concept_{j}" for j in range(1, n + 1)]].astype(str)
                scores = cd[[f"score_{j}" for j in range(1, n + 1)]].apply(pd.to_numeric,
                                                                            errors="coerce")
                # rank_reorder's floor marks concepts with mean cosine <= 0: not candidates
                pairs = [[(c, s) for c, s in zip(cs, ss) if not s <= RANK_REORDER_FLOOR]
                         for cs, ss in zip(names.itertuples(index=False),
                                           scores.itertuples(index=False))]
                frames.append(pd.DataFrame({
                    "unit": cd["unit"].astype(int), "cd_label": cd["description"].astype(str),
                    "cd_score": pd.to_numeric(cd["similarity"], errors="coerce"),
                    "cd_concepts": [[c for c, _ in p] for p in pairs],
                    "cd_scores": [[s for _, s in p] for p in pairs],
                    **{k: _numbers(cd, c) for k, c in CD_TRUST.items()},
                    "cd_trusted": _flags(cd, "trusted"),
                    "cd_trust_label": cd["trust_label"].astype(str) if "trust_label" in cd else "",
                    }).set_index("unit"))
            if dnd is not None:
                labels = [c for c in ("Label 1", "Label 2", "Label 3") if c in dnd]
                frames.append(pd.DataFrame({
                    "unit": dnd["Neuron ID"].astype(int),
                    "dnd_label": dnd[labels[0]].astype(str) if labels else "",
                    "dnd_labels": [[x for x in r if x] for r in
                                   dnd[labels].astype(str).itertuples(index=False)],
                    **{k: _numbers(dnd, c) for k, c in DND_TRUST.items()},
                    }).set_index("unit"))
            if cand is not None and len(cand):
                best = cand[cand["rank"] == cand.groupby("unit")["rank"].transform("min")]
                frames.append(pd.DataFrame({
                    "unit": best["unit"].astype(int),
                    "dnd_score": pd.to_numeric(best["score"], errors="coerce")}
                ).drop_duplicates("unit").set_index("unit"))
            if frames:
                t = pd.concat(frames, axis=1).sort_index().rename_axis("unit").reset_index()
                parts.append(t.assign(layer=layer))
        cols = ["layer", "unit", "cd_label", "cd_score", "cd_concepts", "cd_scores", "dnd_label",
                "dnd_labels", "dnd_score"]
        full = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
        for c in cols:
            if c not in full:
                full[c] = None
        table = self._with_quality(full[cols])
        for c in TRUST_COLUMNS:  # absent in older runs, and for neurons of the other method only
            if c == "cd_trusted":
                table[c] = full[c].eq(True) if c in full else False
            elif c == "cd_trust_label":
                table[c] = full[c].fillna("").astype(str) if c in full else ""
            else:
                table[c] = pd.to_numeric(full[c], errors="coerce") if c in full else float("nan")
        self._cache["neuron_table"] = table
        return table.copy()

    def _with_quality(self, table: pd.DataFrame) -> pd.DataFrame:
        """`table` with the per-method quality columns of `08_label_quality.csv` appended."""
        cols = [f"{p}_{m}" for p in QUALITY_SOURCES for m in QUALITY_METRICS]
        labels = [f"{p}_quality_label" for p in QUALITY_SOURCES]
        quality = self.label_quality()
        if quality is None or not len(quality) or not len(table):
            return table.assign(**{c: float("nan") for c in cols}, **{c: "" for c in labels})
        q = quality.assign(unit=pd.to_numeric(quality["unit"], errors="coerce"),
                           source=quality["source"].astype(str),
                           layer=quality["layer"].astype(str))
        q = q[q["unit"].notna() & q["source"].isin(list(QUALITY_SOURCES.values()))]
        wide = []
        for prefix, source in QUALITY_SOURCES.items():
            part = q[q["source"] == source].drop_duplicates(["layer", "unit"])
            # empty cells (keep_default_na=False leaves them '') are NaN metrics
            # the label stage 08 judged: re-chosen on its select split when the run's own
            # was not held out, and then it can differ from the run's label of the neuron
            wide.append(pd.DataFrame({f"{prefix}_quality_label": part["label"].astype(str),
                                      **{f"{prefix}_{m}": pd.to_numeric(part[m], errors="coerce")
                                         for m in QUALITY_METRICS}}).set_index(
                pd.MultiIndex.from_arrays([part["layer"], part["unit"].astype(int)])))
        wide = pd.concat(wide, axis=1)
        keys = pd.MultiIndex.from_arrays([table["layer"].astype(str),
                                          pd.to_numeric(table["unit"]).astype(int)])
        wide = wide.reindex(keys)
        out = table.copy()
        for c in cols:
            out[c] = wide[c].to_numpy(dtype=float) if c in wide else float("nan")
        for c in labels:
            out[c] = wide[c].fillna("").to_numpy(dtype=object) if c in wide else ""
        return out


def _numbers(table: pd.DataFrame, column: str):
    """`table[column]` as floats ('' and text = NaN), or NaN when the column is absent."""
    return pd.to_numeric(table[column], errors="coerce") if column in table else float("nan")


def _flags(table: pd.DataFrame, column: str):
    """`table[column]` as bools (written True/False; '' = False), or False when absent."""
    if column not in table:
        return False
    return table[column].astype(str).str.strip().str.lower().isin(("true", "1", "1.0", "yes"))
