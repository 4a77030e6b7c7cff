"""Held-out trust scores of labels, for display: the text shown beside a label and a layer's
neurons ranked by trust.

Stage 02 scores each CLIP-Dissect label on probe images it did not choose the label from
(simulation r, a permutation p-value against random concepts, its BH-adjusted q within the layer,
CoSy AUC) and calls it trusted when q < trust.alpha; stage 06 scores DnD's Label 1 the same way.
Both helpers read `RunView.neuron_table()`'s trust columns; a run older than those columns has only
NaN there, so the text is "" and the ranking is empty.

Example:
    >>> trust_text(0.3141, 0.004, 0.712, q=0.012, trusted=True)
    'r = 0.31, p = 0.004, AUC 0.71 · ✓ trusted (q = 0.012)'
    >>> trust_text(float("nan"), None, None)
    ''
"""
from __future__ import annotations

import math

import pandas as pd

TRUSTED_MARK = "✓ trusted"


def _known(x) -> "float | None":
    """`x` as a float, or None when it is missing (None, NaN, '' or not a number)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def trust_text(r=None, p=None, auc=None, q=None, trusted=None, label: str = "") -> str:
    """One label's held-out score, e.g. "r = 0.31, p = 0.004, AUC 0.71 · ✓ trusted (q = 0.012)".

    q and trusted (CLIP-Dissect's labels only) add the marker; `label` names the label the
    scores judge when it is not the one shown beside them. "" when no score is known.
    """
    r, p, auc, q = (_known(x) for x in (r, p, auc, q))
    if r is None and p is None and auc is None and q is None:
        return ""

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    text = f"r = {fmt(r, '.2f')}, p = {fmt(p, '.3g')}, AUC {fmt(auc, '.2f')}"
    if q is not None:  # untested neurons (q NaN) get no verdict rather than "not trusted"
        text += f" · {TRUSTED_MARK if trusted else 'not trusted'} (q = {q:.3g})"
    return (f"“{label}”: " if label else "") + text


def rank_by_trust(table: pd.DataFrame, layer: "str | None" = None, min_r: "float | None" = None,
                  trusted_only: bool = True) -> pd.DataFrame:
    """Rows of a neuron table ranked by CLIP-Dissect's held-out trust, most trusted first.

    Keeps `layer`'s rows (all layers when None), only trusted ones unless `trusted_only` is
    False, and only those with cd_heldout_r >= `min_r` when given; sorts by cd_heldout_q
    ascending, then cd_heldout_r descending (missing scores last), then layer and unit.
    """
    t = table if layer is None else table[table["layer"] == layer]
    if trusted_only:
        t = t[t["cd_trusted"].astype(bool)]
    if min_r is not None:
        t = t[pd.to_numeric(t["cd_heldout_r"], errors="coerce") >= min_r]
    order = t.assign(_q=pd.to_numeric(t["cd_heldout_q"], errors="coerce"),
                     _r=-pd.to_numeric(t["cd_heldout_r"], errors="coerce"))
    order = order.sort_values(["_q", "_r", "layer", "unit"], na_position="last", kind="stable")
    return order.drop(columns=["_q", "_r"]).reset_index(drop=True)


def row_trust(row) -> "tuple[dict, dict]":
    """(CLIP-Dissect's, DnD's) held-out scores of one neuron-table row, as `trust_text` keyword
    dicts with floats or None; {} for a label without any score."""
    label = str(getattr(row, "cd_trust_label", "") or "")
    cd = {"r": _known(row.cd_heldout_r), "p": _known(row.cd_heldout_p),
          "q": _known(row.cd_heldout_q), "auc": _known(row.cd_cosy_auc),
          "trusted": bool(row.cd_trusted),
          # the scores judge the label chosen on the select half: name it when it differs
          "label": label if label != str(row.cd_label) else ""}
    dnd = {"r": _known(row.dnd_heldout_r), "p": _known(row.dnd_heldout_p),
           "auc": _known(row.dnd_cosy_auc)}
    return cd if trust_text(**cd) else {}, dnd if trust_text(**dnd) else {}


def trusted_choices(table: pd.DataFrame, layer: str, limit: int = 200
                    ) -> "tuple[str, list[tuple[str, tuple[str, int]]]]":
    """A heading and up to `limit` (text, (layer, unit)) choices of `layer`'s trusted neurons,
    most trusted first; the heading says when the run has no trust scores at all."""
    scored = table[table["layer"] == layer]
    ranked = rank_by_trust(scored)
    if not scored[["cd_heldout_r", "cd_heldout_q"]].notna().any().any():
        head = f"no trust scores for {layer} (an older run: rerun notebook 02)"
    else:
        head = f"{len(ranked)} of {len(scored)} neurons of {layer} trusted, best first"
    return head, [(f"{layer}:{int(r.unit)} · {r.cd_label} · r {r.cd_heldout_r:.2f} · "
                   f"q {r.cd_heldout_q:.3g}", (layer, int(r.unit)))
                  for r in ranked.head(limit).itertuples(index=False)]
