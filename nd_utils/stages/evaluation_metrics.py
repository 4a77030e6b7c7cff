"""The final-layer evaluation's metrics: top-k accuracy, covered neurons and mean pair cosines.

Pure functions of tensors (no model, no store), used by `evaluation.evaluate_final_layer`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import NdUtilsError
from ..similarity import top_concepts

def topk_accuracy(sim: torch.Tensor, k: int, neurons: "torch.Tensor | None" = None) -> float:
    """% of rows i (neurons) whose own index i is among the k best columns (concepts) of row i.

    As in the reference (`torch.topk` of each row, hit when the neuron's class is in it), with
    ties broken by index and NaN ranked last (`top_concepts`). Needs concept i = class i.
    `neurons` (indices): count only these rows (e.g. the classes the probe has images of).

    Example:
        >>> sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.3, 0.2]])
        >>> round(topk_accuracy(sim, 1), 2), topk_accuracy(sim, 2)
        (33.33, 100.0)
        >>> topk_accuracy(sim, 1, neurons=torch.tensor([0, 2]))
        50.0
    """
    own = torch.arange(sim.shape[0]) if neurons is None else torch.as_tensor(neurons).long()
    idx = top_concepts(sim[own], k)[1]
    return float((idx == own.unsqueeze(1)).any(dim=1).double().mean() * 100)


def covered_neurons(probe, n_classes: int) -> torch.Tensor:
    """Indices of the final-layer neurons (classes) with at least one image in `probe`; all of
    them when no image has a class index (the coverage is then unknown).

    >>> from types import SimpleNamespace as NS
    >>> covered_neurons(NS(items=[NS(class_index=2), NS(class_index=None), NS(class_index=2)]), 4)
    tensor([2])
    """
    seen = sorted({it.class_index for it in probe.items
                   if it.class_index is not None and 0 <= it.class_index < n_classes})
    return torch.tensor(seen, dtype=torch.long) if seen else torch.arange(n_classes)


class _EmbeddingCache:
    """Unit embeddings of strings, each string encoded once across all rows of the table."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]):
        self.encode, self.vectors = encode, {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = sorted(set(texts) - self.vectors.keys())
        if new:
            emb = torch.nn.functional.normalize(torch.as_tensor(self.encode(new)).float().cpu(),
                                                dim=1)
            self.vectors.update(zip(new, emb))
        return torch.stack([self.vectors[t] for t in texts])


def mean_pair_cosine(encode: Callable[[list[str]], torch.Tensor], preds: Sequence[str],
                     truths: Sequence[str]) -> float:
    """Mean over k of cos(encode(preds[k]), encode(truths[k])); embeddings are L2-normalised.

    Example:
        >>> enc = lambda t: torch.tensor([[1.0, 0.0] if s == "a" else [0.0, 2.0] for s in t])
        >>> mean_pair_cosine(enc, ["a", "a"], ["a", "b"])
        0.5
    """
    if len(preds) != len(truths):
        raise NdUtilsError(f"{len(preds)} labels but {len(truths)} ground-truth strings")
    a = torch.nn.functional.normalize(torch.as_tensor(encode(list(preds))).float(), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(encode(list(truths))).float(), dim=1)
    return float((a * b).sum(1).mean())
