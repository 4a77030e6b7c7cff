"""The blockwise machinery behind the similarity functions (`nd_utils.similarity_formulas`).

How speed and bounded memory are obtained:

- Concepts are processed in column blocks on `num_workers` threads (torch ops release the GIL);
  torch's intra-op threading is 1 meanwhile and restored afterwards (`_pool`, `_blocks`). Only
  the [K, M] output is allocated in full; a block holds all K neurons, so the wpmi prior
  (logsumexp over K) is exact.
- wpmi/soft_wpmi never build softmax(a*P) [N, M]: a first pass keeps per image the max of a*P and
  softmax's 1/sum, then each block exponentiates only the rows of the neurons' top images.
- soft_wpmi's term 1 + p_r*(Q-1) + min_prob comes from one `embedding_bag` (gather, scale and two
  adds with the reference's float32 rounding); the log per term and torch.sum over ranks are kept
  as in the reference because sim = L - prior cancels |L| ~ 500 and float32 rounding shows.
- rank_reorder sorts int32 keys (dense rank << bits | position) with NumPy's SIMD sort on CPU,
  far faster than torch.sort with indices.
- P is read only by column blocks (and, for wpmi's normaliser, row blocks): pass
  `nd_utils.cosines.factorized(image_features, text_features)` (a `Cosines`) and each block is
  computed where it is read, so P [N, M] is never formed whole (9 GB at the paper's N = 113,000,
  M = 20,000); on the CPU the results equal the dense call's bit for bit. Nor is A copied whole
  (top images are found by neuron chunks; the cosine functions read A through a transposed
  view). A dense P on the CPU with a CUDA `device` stays there and its blocks are copied to the
  device as read (`_prepare`).
- On CUDA, `neuron_chunk` sizes the chunks from the free memory; stages call the functions through
  `nd_utils.similarity.similarity_on_device`, which halves the chunk on out-of-memory and finally
  falls back to the CPU. On the CPU every default is the tuned one above, and the results do not
  change.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from .cosines import Cosines, read_rows
from .errors import NdUtilsError
from .machine import fit_chunk

_BLOCK = 256  # concepts per work item: a [K, 256] block of the output


def _where(layer: "str | None") -> str:
    return f" of layer {layer!r}" if layer else ""


def _finite(x: torch.Tensor) -> bool:
    """One reduction pass: NaN and inf propagate to min/max, no [N, M] boolean mask is built."""
    lo, hi = torch.aminmax(x)
    return math.isfinite(lo) and math.isfinite(hi)


def _prepare(clip_feats, target_feats, device, layer):
    """Validate both inputs; return float32 A and P for the compute device and that device.

    A moves to the device; so does a Cosines (its two feature matrices) and a dense P when the
    device is the CPU or P is there already (as before); a dense P elsewhere stays where it is
    and is copied block by block (`read_columns`, `read_rows`)."""
    lazy = isinstance(clip_feats, Cosines)
    P = clip_feats if lazy else torch.as_tensor(clip_feats)
    A = torch.as_tensor(target_feats)
    for name, x in (("clip_feats [N images, M concepts]", P), ("target_feats [N images, K neurons]", A)):
        if x.dim() != 2 or 0 in x.shape:
            raise NdUtilsError(f"{name} must be a non-empty 2-D tensor, got shape {tuple(x.shape)}")
    if P.shape[0] != A.shape[0]:  # never truncate: a mismatch means the probe sets differ
        raise NdUtilsError(f"image counts differ: clip_feats has {P.shape[0]} rows, target_feats"
                           f"{_where(layer)} has {A.shape[0]}; both must come from the same probe set")
    dev = torch.device(device) if device is not None else P.device
    if dev.type == "cuda" and dev.index is None:  # "cuda" -> "cuda:i", which tensors report
        dev = torch.device("cuda", torch.cuda.current_device())
    A = A.detach().to(dev, torch.float32)
    if lazy:
        P = P.to(dev)
    elif dev.type == "cpu" or P.device == dev:
        P = P.detach().to(dev, torch.float32)
    else:
        P = P.detach().float()
    if not _finite(A):
        units = (~torch.isfinite(A)).any(0).nonzero()[:, 0].tolist()
        raise NdUtilsError(f"target_feats{_where(layer)} has NaN/inf for neuron(s) {units[:10]}"
                           f"{' ...' if len(units) > 10 else ''} ({len(units)} of {A.shape[1]});"
                           f" recompute or drop those activations")
    if not (_finite(P.image_feats) and _finite(P.text_feats) if lazy else _finite(P)):
        cols = torch.cat([(~torch.isfinite(read_rows(P, i, i + 1024, P.device))).any(0, keepdim=True)
                          for i in range(0, P.shape[0], 1024)]).any(0).nonzero()[:, 0].tolist()
        raise NdUtilsError(f"clip_feats has NaN/inf for concept(s) {cols[:10]} ({len(cols)} of "
                           f"{P.shape[1]}); check the text/image features")
    return P, A, dev


@contextmanager
def _pool(dev: torch.device, num_workers: "int | None"):
    """Yield a `map` running blocks on threads (CPU) or sequentially (GPU / one worker)."""
    n = num_workers or (torch.get_num_threads() if dev.type == "cpu" else 1)
    if n <= 1:
        yield lambda f, items: list(map(f, items))
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per block beats OpenMP barriers on small ops
    try:
        with ThreadPoolExecutor(n) as ex:
            yield lambda f, items: list(ex.map(f, items))
    finally:
        torch.set_num_threads(old)


def _blocks(M: int, width: int = _BLOCK) -> list[tuple[int, int]]:
    """Concept blocks starting at multiples of _BLOCK; a tail under 64 joins the previous block so
    that torch.sum over ranks takes the same (vectorised) path, hence rounding, as over all M."""
    b = [[m0, min(M, m0 + width)] for m0 in range(0, M, width)]
    if len(b) > 1 and b[-1][1] - b[-1][0] < 64:
        last = b.pop()
        b[-1][1] = last[1]
    return [tuple(x) for x in b]


def _col_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each column: sqrt(sum of squares) is ~4x faster than torch.norm(dim=0) here and
    more accurate (1e-7 vs 2e-6 relative at N = 10,000, which is all it changes)."""
    if x.shape[1] > _BLOCK:  # by column chunks: the squares of a large A [N, K] are never whole
        return torch.cat([_col_norm(x[:, k:k + _BLOCK]) for k in range(0, x.shape[1], _BLOCK)], 1)
    return x.square().sum(0, keepdim=True).sqrt_()


def _slice_width(n_images: int) -> int:
    """Concepts per transformed slice of P in the cosine functions: 1024, fewer for large N so
    that a slice [N, w] stays near 64 MB (w = 128 at the paper's N = 113,000)."""
    return max(64, min(4 * _BLOCK, (2**24 // max(n_images, 1)) // 64 * 64))


def _top_images(A: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each neuron's k highest activations and their images, (values, indices) `[K, k]`,
    descending; A `[N, K]` is read by neuron chunks, never copied whole as A.T `[K, N]`."""
    parts = [A[:, k0:k0 + chunk].T.contiguous().topk(k, dim=1) for k0 in range(0, A.shape[1], chunk)]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


class _Scratch:
    """Buffers reused by the work items of one call, a set per thread (dropped with the call).

    The items of a call need same-sized temporaries ([64, M] rows of P in wpmi's normaliser,
    [U, 256] tables per concept block). Taken afresh each time they leave the allocator holes it
    cannot always refill (glibc's per-thread arenas): at 100,000 concepts that cost ~1 GB of
    resident memory; reused, the cost is one set per thread.
    >>> s = _Scratch(torch.device("cpu"))
    >>> s.take("x", 2, 3).shape, s.take("x", 1, 4).data_ptr() == s.take("x", 2, 3).data_ptr()
    (torch.Size([2, 3]), True)
    """

    def __init__(self, dev: torch.device):
        self.dev, self._bufs = dev, {}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        """A float32 tensor of `shape` (uninitialised), the thread's buffer `name` if it fits."""
        n, key = math.prod(shape), (threading.get_ident(), name)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, device=self.dev)
        return buf[:n].view(shape)


# the published defaults of the hyperparameters that size a chunk; similarity_formulas uses them
# as its functions' defaults, so `neuron_chunk` needs no lookup of the functions themselves
WPMI_TOP_K, SOFT_WPMI_TOP_K, RANK_REORDER_TOP_FRACTION = 28, 100, 0.05
_DEFAULTS = {("wpmi", "top_k"): WPMI_TOP_K, ("soft_wpmi", "top_k"): SOFT_WPMI_TOP_K,
             ("rank_reorder", "top_fraction"): RANK_REORDER_TOP_FRACTION}


def _default(name: str, key: str, hyper: dict):
    return hyper[key] if key in hyper else _DEFAULTS[name, key]


def neuron_chunk(name: str, n_images: int, n_concepts: int, n_neurons: int, device,
                 **hyperparameters) -> "int | None":
    """Neurons per chunk for similarity function `name` computing on `device`.

    None on the CPU: each function keeps its own default there, tuned for the caches. On CUDA as
    many neurons as fit in half the free memory (`machine.fit_chunk`) beside the call's fixed
    working set: A [N, K] and its transposed copy, the output [K, M] and a few [N, block] slices
    of P. Per neuron and concept block: soft_wpmi's embedding_bag terms [top_k, 256]; wpmi's
    sums [256]; rank_reorder's int64 sort keys, torch.sort's values, indices and buffers and
    the gathered activations [64, n]. The cosine functions have no per-neuron buffer: every neuron.
    >>> neuron_chunk("soft_wpmi", 113_000, 20_000, 2048, "cpu") is None
    True
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    N, M, K = int(n_images), int(n_concepts), int(n_neurons)
    fixed = 4 * (2 * N * K + K * M + 4 * N * _BLOCK)
    if name in ("wpmi", "soft_wpmi"):
        t = min(int(_default(name, "top_k", hyperparameters)), N)
        per = (2 * 4 * t * _BLOCK + 3 * 12 * t) if name == "soft_wpmi" else (8 * _BLOCK + 8 * t)
    elif name == "rank_reorder":
        n = max(2, int(N * float(_default(name, "top_fraction", hyperparameters))))
        per = 64 * n * (6 * 8 + 2 * 4)             # keys, sort values/indices/buffers, d
        fixed += 64 * N * 8 * 4                     # ranks, sorted keys, their transpose
    else:
        return K
    return fit_chunk(per, device=dev, hi=K, fixed_bytes=fixed)
