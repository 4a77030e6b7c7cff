"""The similarity functions by name (a `Registry`) and how stages call them.

`list_similarities()` gives the names in the order of METHODS.md, `get_similarity(name)` the
function, and `register_similarity(name)` adds or replaces one: a function
`f(clip_feats [N, M], target_feats [N, K], *, <hyperparameters>, chunk_size=None, device=None,
layer=None) -> sim [K, M]` (its keyword-only hyperparameters are what `clip_dissect.hyperparameters`
may set). The five published ones are in `nd_utils.similarity_formulas`, their blockwise machinery
in `nd_utils.similarity_blocks`. Stages call a function through `similarity_on_device` (CUDA
chunks from the free memory, out-of-memory halving, CPU fallback) and choose labels with
`top_concepts`.

Example:
    >>> @register_similarity("dot")
    ... def dot(clip_feats, target_feats, *, chunk_size=None, device=None, layer=None):
    ...     return torch.as_tensor(target_feats).T @ torch.as_tensor(clip_feats)
    >>> list_similarities()[-1], get_similarity("dot") is dot
    ('dot', True)
    >>> _ = SIMILARITIES.entries.pop("dot")  # (the example leaves the registry as it was)
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from .errors import unknown_name
from .machine import resolve_device
from .registry import Registry
from .similarity_blocks import _where, neuron_chunk
from .similarity_formulas import cos_similarity, cos_similarity_cubed, rank_reorder, soft_wpmi, wpmi

SIMILARITIES = Registry("similarity function", sort=False)
SIMILARITIES.register("cos_similarity", cos_similarity)
SIMILARITIES.register("cos_similarity_cubed", cos_similarity_cubed)
SIMILARITIES.register("rank_reorder", rank_reorder)
SIMILARITIES.register("wpmi", wpmi)
SIMILARITIES.register("soft_wpmi", soft_wpmi)
register_similarity = SIMILARITIES.register


def list_similarities() -> list[str]:
    """Names accepted by `get_similarity`: the five of METHODS.md in its order, then any added
    with `register_similarity`."""
    return SIMILARITIES.names()


def get_similarity(name: str) -> Callable[..., torch.Tensor]:
    """Return the similarity function called `name` (UnknownNameError listing the valid ones).

    >>> get_similarity("soft_wpmi") is soft_wpmi
    True
    """
    return SIMILARITIES.get(name)


def pmi_with_prior(name, clip_feats, target_feats, **hyperparameters):
    """(sim [K, M], prior [M]) of `wpmi` or `soft_wpmi`: keep a layer's prior for subset runs.

    >>> P, A = torch.rand(40, 5), torch.rand(40, 3)
    >>> sim, prior = pmi_with_prior("wpmi", P, A)
    >>> torch.equal(wpmi(P, A[:, :1], prior=prior), sim[:1])
    True
    """
    if name not in ("wpmi", "soft_wpmi"):
        raise unknown_name("similarity function with a prior", str(name), ["wpmi", "soft_wpmi"])
    return get_similarity(name)(clip_feats, target_feats, return_prior=True, **hyperparameters)

def top_concepts(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best concepts per neuron: (scores [K, k'], indices [K, k']), k' = min(k, M).

    Best first; equal scores in index order (a stable sort, so floored rank_reorder pairs and
    other ties come out the same on every machine); NaN ranks below every number (torch.topk
    and argmax would rank it first) and is returned as NaN.
    >>> top_concepts(torch.tensor([[0.1, float("nan"), 0.3, 0.3]]), 3)[1].tolist()
    [[2, 3, 0]]
    """
    sim = torch.as_tensor(sim).float()
    k = min(int(k), sim.shape[1])
    nan = torch.isnan(sim)
    key = sim.masked_fill(nan, -math.inf) if nan.any() else sim
    vals, idx = key.topk(k, dim=1)                    # fast; its order among ties is arbitrary
    order = idx.argsort(dim=1)                        # so: by index, then stably by value
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    idx = idx.gather(1, vals.argsort(dim=1, descending=True, stable=True))
    # rows where ties straddle the cut (topk may have kept any of them) or with NaN: full sort
    full = (key >= vals.min(1, keepdim=True).values).sum(1) > k
    full |= nan.any(1)
    if full.any():
        rows = full.nonzero()[:, 0]
        o = torch.sort(key[rows], dim=1, descending=True, stable=True).indices
        # NaN after -inf too: a second stable sort on the NaN flag alone
        o = o.gather(1, torch.sort(nan[rows].gather(1, o).to(torch.uint8), dim=1,
                                   stable=True).indices)
        idx[rows] = o[:, :k]
    return sim.gather(1, idx), idx

def similarity_on_device(fn, clip_feats, target_feats, *, device=None, chunk_size=None,
                         **hyperparameters) -> torch.Tensor:
    """`fn(clip_feats, target_feats, **hyperparameters)` computed on `device` (a config's
    `device`: auto/cpu/cuda; `machine.config_device`), returned on the CPU. How stages call the
    similarity functions.

    On CUDA the neurons per chunk come from the free memory (`neuron_chunk`, or `chunk_size`);
    on torch.cuda.OutOfMemoryError the call is retried with half the chunk, down to one neuron,
    then on the CPU with a warning (the same similarities up to float rounding). On the CPU it
    is the plain call, with the functions' own defaults; so is any other device (mps), on
    which these functions are not tested.
    >>> P, A = torch.rand(40, 5), torch.rand(40, 3)
    >>> torch.equal(similarity_on_device("wpmi", P, A, device="cpu"), wpmi(P, A))
    True
    """
    fn = get_similarity(fn) if isinstance(fn, str) else fn
    dev = resolve_device(device)
    if dev.type != "cuda":
        dev = torch.device("cpu")
    else:
        (N, M), K = clip_feats.shape, torch.as_tensor(target_feats).shape[1]
        chunk = chunk_size or neuron_chunk(fn.__name__, N, M, K, dev, **hyperparameters) or K
        while True:
            try:
                return fn(clip_feats, target_feats, device=dev, chunk_size=chunk,
                          **hyperparameters).cpu()
            except torch.cuda.OutOfMemoryError:
                pass  # leaving the handler frees the failed call's tensors; then the cache
            torch.cuda.empty_cache()
            if chunk <= 1:
                break
            chunk = max(1, chunk // 2)
        warnings.warn(f"{fn.__name__}{_where(hyperparameters.get('layer'))}: out of CUDA memory "
                      f"even with one neuron per chunk; computing on the CPU", stacklevel=2)
        dev = torch.device("cpu")
    return fn(clip_feats, target_feats, device=dev, chunk_size=chunk_size, **hyperparameters)
