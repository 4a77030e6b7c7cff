"""DnD's candidate scoring (step 5): ranks of each candidate's images among all, the four
scores of the paper, and the registry of named scorings (`selection.scoring`).

Tensors and arrays in, tables out; no config. A scoring is a column of `score_candidates`'
table and a direction; `register_scoring` adds one, usable by name in configs.

Example:
    >>> import numpy as np
    >>> acts = {"a": np.array([5.0, 1.0]), "b": np.array([4.0, 3.0])}
    >>> rank_by(score_candidates(acts, beta=2), "topk-sq-mean").candidate.tolist()
    ['b', 'a']
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .errors import NdUtilsError
from .registry import Registry


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
