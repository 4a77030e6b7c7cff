"""Stage 08's statistics: bootstrap means per label source, CLIP-Dissect vs DnD, sanity ordering.

The label sources (the two methods and the sanity labels) and the metrics each row of
`08_label_quality.csv` holds; the functions turn that table into `08_quality_summary.csv`,
`08_method_comparison.csv` and `08_sanity_checks.csv`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import label_metrics as lm

METRICS = ("auc", "mad", "auprc", "sim_r")
METHODS = ("clip_dissect", "dnd")
CONSTANT = "constant 'depiction'"
TRUE, RANDOM = "true class", "random concept"


def summarise_quality(table: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """`layer, source, metric, mean, ci_low, ci_high, n`: bootstrap means over neurons; layer
    "all" pools every layer."""
    rows = []
    for layer, t in [*table.groupby("layer", sort=False), ("all", table)]:
        for source, g in t.groupby("source", sort=False):
            for metric in METRICS:
                vals = g[metric].to_numpy(dtype=float)
                mean, low, high = lm.bootstrap_mean_ci(vals, n_boot=n_boot, seed=seed)
                rows.append({"layer": layer, "source": source, "metric": metric, "mean": mean,
                             "ci_low": low, "ci_high": high, "n": int(np.isfinite(vals).sum())})
    return pd.DataFrame(rows)


def compare_methods(table: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired CLIP-Dissect vs DnD per layer (and "all") and metric: diff = CD - DnD."""
    rows = []
    for layer, t in [*table.groupby("layer", sort=False), ("all", table)]:
        wide = {m: t[t.source == m].set_index(["layer", "unit"]) for m in METHODS}
        units = wide["clip_dissect"].index.intersection(wide["dnd"].index)
        if not len(units):
            continue
        for metric in METRICS:
            c = lm.paired_comparison(wide["clip_dissect"].loc[units, metric].to_numpy(float),
                                     wide["dnd"].loc[units, metric].to_numpy(float),
                                     n_boot=n_boot, seed=seed)
            rows.append({"layer": layer, "metric": metric, "clip_dissect": c["mean_a"],
                         "dnd": c["mean_b"], "diff": c["diff"], "diff_low": c["diff_low"],
                         "diff_high": c["diff_high"], "p_wilcoxon": c["p_wilcoxon"],
                         "p_permutation": c["p_permutation"], "n": c["n"]})
    return pd.DataFrame(rows)


def sanity_checks(summary: pd.DataFrame) -> pd.DataFrame:
    """`layer, metric, method, higher, lower, higher_value, lower_value, ok`: the expected order
    true class > method > shuffled > constant, and method > random concept (a missing source,
    e.g. the true class off the final layer, is skipped)."""
    rows = []
    for (layer, metric), g in summary.groupby(["layer", "metric"], sort=False):
        means = dict(zip(g.source, g["mean"]))
        for method in METHODS:
            if method not in means:
                continue
            order = [TRUE, method, f"shuffled {method}", CONSTANT]
            checks = lm.sanity_ordering(means, order) + lm.sanity_ordering(means, [method, RANDOM])
            rows += [{"layer": layer, "metric": metric, "method": method, **c} for c in checks]
    return pd.DataFrame(rows, columns=["layer", "metric", "method", "higher", "lower",
                                       "higher_value", "lower_value", "ok"])
