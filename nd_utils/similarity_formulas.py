"""CLIP-Dissect's five similarity functions `f(P [N, M], A [N, K]) -> sim [K, M]` (METHODS.md §2).

P holds image-concept cosines (N images x M concepts), A pooled activations (K neurons). Defaults
and keyword names are the published ones; outputs match the reference's float32 results
(tests/test_similarity.py). They are computed by blocks, in bounded memory, with P dense or
`nd_utils.cosines.factorized` (`nd_utils.similarity_blocks` says how). They are looked up by
name, and stages call them, through `nd_utils.similarity` (the registry).
Common keywords: chunk_size (neurons per chunk), device (default: clip_feats' device; the output
lives there), layer (named in error messages), num_workers (default: torch.get_num_threads()).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .cosines import Cosines, read_columns, read_rows
from .errors import NdUtilsError
from .machine import fit_chunk
from .similarity_blocks import (RANK_REORDER_TOP_FRACTION, SOFT_WPMI_TOP_K, WPMI_TOP_K, _blocks,
                                _col_norm, _pool, _prepare, _Scratch, _slice_width, _top_images,
                                _where, neuron_chunk)

_TRANSFORMED_A_BYTES = 2**29  # cos_similarity_cubed's cubed A is built in parts of this size


def _matmul_sim(P, A, transform, chunk_size, device, layer, column_scale=None):
    """Shared body of the two cosine functions: out = transform(A).T @ transform(P) by slices.

    `column_scale(A)` [1, K], when given, replaces transform(A) by A scaled afterwards (cosine:
    a column scaling), so no copy of A is made; otherwise transform(A).T [K, N] is built in
    parts of neurons (one buffer, filled by neuron chunks)."""
    P, A, dev = _prepare(P, A, device, layer)
    (N, M), K = P.shape, A.shape[1]
    # transform(A).T [K, N] is built in parts of at most _TRANSFORMED_A_BYTES (one part below
    # 134 M entries; two at the paper's 113,000 x 2,048), P's slices recomputed for each part
    part = K if column_scale else -(-K // -(-4 * K * N // _TRANSFORMED_A_BYTES))
    out = torch.empty(K, M, device=dev)
    step, width = chunk_size or K, _slice_width(N)
    # one buffer for every part: a fresh one per part may not reuse the last one's memory
    buffer = None if column_scale else torch.empty(part, N, device=dev)
    for p0 in range(0, K, part):
        p1 = min(K, p0 + part)
        if column_scale:
            At = A.T
        else:  # transform is per column: filled by neuron chunks, one chunk's temporaries
            At = buffer[:p1 - p0]
            for k0 in range(p0, p1, 64):   # 64 neurons: temporaries of 29 MB at N = 113,000
                k1 = min(p1, k0 + 64)
                At[k0 - p0:k1 - p0] = transform(A[:, k0:k1], inplace=False).T
        for m0 in range(0, M, width):  # one transformed [N, width] slice of P at a time
            cols = read_columns(P, m0, min(m0 + width, M), dev)
            # a computed (factorized) or copied slice is ours to overwrite; a view of P is not
            Pb = transform(cols, inplace=isinstance(P, Cosines) or P.device != dev)
            for k0 in range(p0, p1, step):
                k1 = min(p1, k0 + step)
                torch.matmul(At[k0 - p0:k1 - p0], Pb, out=out[k0:k1, m0:m0 + Pb.shape[1]])
    if column_scale:
        out.mul_(column_scale(A).T)
    return out


def cos_similarity(clip_feats, target_feats, *, chunk_size=None, device=None, layer=None):
    """Cosine between activation and concept columns over images (no centring) -> [K, M].

    Shapes: clip_feats [N, M], target_feats [N, K]. A zero column gives a row/column of 0.
    >>> cos_similarity(torch.rand(10, 3), torch.rand(10, 2)).shape
    torch.Size([2, 3])
    """
    def inverse_norm(x):  # a zero norm (dead neuron) keeps its zeros instead of 0/0 = NaN
        return _col_norm(x).clamp_min(torch.finfo(x.dtype).tiny).reciprocal_()

    def unit(x, inplace):
        return x.mul_(inverse_norm(x)) if inplace else x * inverse_norm(x)
    return _matmul_sim(clip_feats, target_feats, unit, chunk_size, device, layer,
                       column_scale=inverse_norm)


def cos_similarity_cubed(clip_feats, target_feats, *, min_norm=1e-3, chunk_size=None, device=None,
                         layer=None):
    """Cosine after centring each column and cubing it; norms clipped below at `min_norm` -> [K, M].

    >>> cos_similarity_cubed(torch.rand(10, 3), torch.rand(10, 2)).shape
    torch.Size([2, 3])
    """
    def cube(x, inplace):  # in place: no [N, w] temporaries beside the slice itself
        x = (x.sub_ if inplace else x.sub)(x.mean(dim=0, keepdim=True)).pow_(3)
        return x.div_(_col_norm(x).clamp_min(min_norm))
    return _matmul_sim(clip_feats, target_feats, cube, chunk_size, device, layer)


def _sort_last(keys: torch.Tensor) -> torch.Tensor:
    if keys.device.type == "cpu":  # NumPy's AVX-512 sort; releases the GIL
        return torch.from_numpy(np.sort(keys.numpy(), axis=-1))
    return torch.sort(keys, dim=-1).values


def _orderable(x: torch.Tensor) -> torch.Tensor:
    """int32 keys with the order of the float32 values (sign-magnitude -> two's complement)."""
    b = x.contiguous().view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


RANK_REORDER_FLOOR = float(torch.finfo(torch.float32).min)  # -3.4028235e38
_ABOVE_FLOOR = float(np.nextafter(np.float32(RANK_REORDER_FLOOR), np.float32(0)))


RANK_BLOCK_ELEMENTS = 2**20  # rank_reorder: concepts per block x images, about (see below)


def _rank_block_width(n_images: int) -> int:
    """Concepts per rank_reorder block: 64, fewer for large N (8 at the paper's 113,000), as each
    block sorts and ranks int64 keys [w, N] several times over (~20 x 8 bytes per entry, on each
    thread). The scores do not depend on it."""
    w = 64
    while w > 8 and w * n_images > RANK_BLOCK_ELEMENTS:
        w //= 2
    return w


def _floor_invalid(score: torch.Tensor, cmean: torch.Tensor, scale_p) -> torch.Tensor:
    """rank_reorder's score with pairs of mean(c) <= 0 at RANK_REORDER_FLOOR, never NaN/-inf.

    A valid pair (mean(c) > 0) is non-finite only through float32 under/overflow of
    mean(c)^scale_p: -inf becomes the float just above the floor, and 0/0 (a perfect
    re-ordering, error 0) becomes 0, the score error 0 has for every positive mean.
    """
    score = score.nan_to_num_(nan=0.0, neginf=_ABOVE_FLOOR)
    if scale_p == 0:
        return score
    return score.masked_fill_(~(cmean > 0), RANK_REORDER_FLOOR)


def rank_reorder(clip_feats, target_feats, *, p=3, top_fraction=RANK_REORDER_TOP_FRACTION,
                 scale_p=0.5, seed=0, generator=None, chunk_size=None, device=None, layer=None,
                 num_workers=None):
    """Rank-reorder score: -(error of re-ordering top activations by a concept) / mean(c)^scale_p.

    Shapes: clip_feats [N, M], target_feats [N, K] -> [K, M]. n = int(N * top_fraction) top images
    per neuron (raised to 2 with a warning). The chance normaliser B_k averages 5 random
    permutations drawn from `generator` (default torch.Generator seeded `seed`) in neuron order:
    5 randperm calls per neuron, as the reference, so seed 0 reproduces its B_k.

    Concepts whose mean cosine c over the neuron's top images is <= 0 (common with ConSE, whose
    cosines can be negative; CLIP's hardly ever are) score `RANK_REORDER_FLOOR`, the lowest
    finite float32, below every other score: for scale_p > 0 the formula is undefined there
    (NaN for fractional powers, which torch.topk ranks first; a sign flip for odd powers) and
    tends to -inf as mean(c) -> 0+. With scale_p = 0 the mean does not enter and no pair is
    floored. A valid score that overflows float32 is clamped just above the floor.

    Ties: equal concept values c_i among a neuron's top images get ranks in the order of the
    neuron's top-n list (a stable sort: the more active image gets the lower rank). The
    reference ranks c with torch.argsort's default, unstable sort, whose order of tied values
    is an implementation detail: in torch 2.14 on CPU it is ours for n <= 16 (insertion sort)
    and often another one for n > 16 (introsort); CUDA differs again. Where it differs, E and
    the score of that (neuron, concept) pair differ by far more than 1e-5 (the error of one
    swap of two tied images). Exact ties need bit-identical cosines of two top images whose
    activations differ; the golden fixture (n = 30) has one among its 12,000 pairs, which the
    reference happened to order as we do, so the fixture agrees everywhere (< 1e-6).
    >>> rank_reorder(torch.rand(60, 4), torch.rand(60, 2)).shape
    torch.Size([2, 4])
    """
    P, A, dev = _prepare(clip_feats, target_feats, device, layer)
    (N, M), K = P.shape, A.shape[1]
    n = int(N * top_fraction)
    if not 0 < top_fraction <= 1 or N < 2:
        raise NdUtilsError(f"rank_reorder needs 0 < top_fraction <= 1 and N >= 2 images, got "
                           f"{top_fraction} and {N}")
    if n < 2:
        warnings.warn(f"rank_reorder{_where(layer)}: int(N * top_fraction) = {n} for N = {N};"
                      f" using the top 2 images", stacklevel=2)
        n = 2
    vals, idx = _top_images(A, n)                       # [K, n], descending
    asc = vals.flip(1)
    gen = generator or torch.Generator().manual_seed(seed)
    B = torch.empty(K, device=dev)
    for k0 in range(0, K, 64):  # by neuron chunks, drawing the permutations in neuron order
        k1 = min(K, k0 + 64)
        perms = torch.stack([torch.randperm(n, generator=gen)
                             for _ in range(5 * (k1 - k0))]).to(dev)
        asc5 = asc[k0:k1].repeat_interleave(5, 0)       # row 5k + j: neuron k, permutation j
        B[k0:k1] = (asc5 - asc5.gather(1, perms)).abs_().pow_(p).view(k1 - k0, 5 * n).mean(1)
    if (B == 0).any():  # constant top activations: every re-ordering has zero error
        warnings.warn(f"rank_reorder{_where(layer)}: {int((B == 0).sum())} neuron(s) have constant"
                      f" top activations; their scores are 0 (RANK_REORDER_FLOOR for concepts"
                      f" with a mean cosine <= 0)", stacklevel=2)
    B = torch.where(B == 0, torch.ones_like(B), B)
    c_max = (chunk_size or neuron_chunk("rank_reorder", N, M, K, dev, top_fraction=top_fraction)
             or max(1, 2048 // n))                     # neurons per chunk: ~128k keys in L2 (CPU)
    nbits, cbits = max(1, (N - 1).bit_length()), max(1, (c_max * n - 1).bit_length())
    kdt = torch.int32 if nbits + cbits <= 31 else torch.int64   # int32 keys sort ~3x faster
    out = torch.empty(K, M, device=dev)
    pos = torch.arange(N, device=dev)
    chunk_pos = torch.arange(c_max * n, dtype=kdt, device=dev)

    sub = _rank_block_width(N)

    def block(bounds):  # P's columns 64 at a time (one GEMM), ranked `sub` at a time
        b0, b1 = bounds
        Pw = read_columns(P, b0, b1, dev)
        for m0 in range(b0, b1, sub):
            ranked(Pw[:, m0 - b0:min(b1, m0 + sub) - b0].contiguous(), m0, min(b1, m0 + sub))

    def ranked(Pb, m0, m1):
        cmean = F.embedding_bag(idx, Pb, mode="mean")   # [K, w]: mean of c over the top images
        # dense rank of every image per concept (equal values share a rank) so that ties are
        # broken by position among the neuron's top images, as the reference's stable sort does;
        # + 0.0 turns -0.0 into 0.0
        srt = _sort_last(((_orderable(Pb.T.contiguous().add_(0.0)).long() + 2**31) << nbits) | pos)
        v = srt >> nbits
        dense = torch.cat([torch.zeros_like(v[:, :1]), (v[:, 1:] != v[:, :-1]).long()], 1).cumsum(1)
        R = torch.empty_like(srt, dtype=kdt)
        R.scatter_(1, srt & ((1 << nbits) - 1), (dense << cbits).to(kdt))  # rank in high bits
        RT = R.T.contiguous()                           # [N, w]: gathers whole rows below
        err = torch.empty(K, m1 - m0, device=dev)
        for k0 in range(0, K, c_max):
            c = min(c_max, K - k0)
            flat = idx[k0:k0 + c].reshape(-1)
            keys = torch.empty(m1 - m0, c * n, dtype=kdt, device=dev)   # [w, c*n]
            torch.add(RT.index_select(0, flat).T, chunk_pos[:c * n], out=keys)  # low bits: position
            at = _sort_last(keys.view(-1, c, n)).view(-1).bitwise_and_((1 << cbits) - 1)
            d = vals[k0:k0 + c].reshape(-1).index_select(0, at).view(-1, c, n)
            # E = mean_j |a at the j-th smallest c - j-th smallest a|^p  (= mean_i |a_i - ã_i|^p)
            err[k0:k0 + c] = d.sub_(asc[k0:k0 + c]).abs_().pow_(p).mean(2).T
        out[:, m0:m1] = _floor_invalid(-(err / B[:, None]) / cmean.pow(scale_p), cmean, scale_p)

    with torch.no_grad(), _pool(dev, num_workers) as pmap:
        pmap(block, _blocks(M, 64))
    return out


def _pmi(P, A, *, soft, top_k, a, lam, min_prob, p_start, p_end, prior, return_prior, chunk_size,
         device, layer, num_workers):
    """wpmi/soft_wpmi body: sim [K, M], or (sim, prior [M]) with return_prior."""
    name = "soft_wpmi" if soft else "wpmi"
    P, A, dev = _prepare(P, A, device, layer)
    (N, M), K = P.shape, A.shape[1]
    top_k = int(top_k)
    if top_k > N:  # a small probe set must still run with the defaults: clamp, loudly
        warnings.warn(f"{name}{_where(layer)}: top_k = {top_k} > N = {N} images; using top_k = {N}",
                      stacklevel=3)
        top_k = N
    if top_k < 1 or min_prob < 0:
        raise NdUtilsError(f"{name}: need top_k >= 1 and min_prob >= 0, got {top_k}, {min_prob}")
    idx = _top_images(A, top_k)[1]                     # [K, top_k], descending activations
    if prior is not None:
        prior = torch.as_tensor(prior, dtype=torch.float32, device=dev).reshape(-1)
        if prior.numel() != M:
            raise NdUtilsError(f"{name}: prior has {prior.numel()} entries, clip_feats {M} concepts")
    # only the union of the top images' rows of softmax(a*P) is needed; inv indexes into it
    used = torch.zeros(N, dtype=torch.bool, device=dev)
    used[idx.reshape(-1)] = True
    rows, inv = used.nonzero()[:, 0], (used.cumsum(0) - 1)[idx]
    U = rows.numel()
    mx, rinv = torch.empty(U, 1, device=dev), torch.empty(U, 1, device=dev)

    lazy = isinstance(P, Cosines)
    if lazy and U < N:  # factors of the used rows only, gathered once (not once per block)
        P = Cosines(P.image_feats.index_select(0, rows), P.text_feats)
    every = lazy or U == N  # rows = 0..N-1 (usual when K * top_k >> N): slice, do not gather
    local = isinstance(P, torch.Tensor) and P.device == dev   # else P's blocks are copied
    src_rows = None if every else rows.to(P.device)
    # 16 rows keep the temporaries in L2 (CPU; a computed block: 64, a more efficient GEMM); on
    # CUDA as many as fit, a few [rows, M] buffers
    rstep = ((64 if lazy else 16) if dev.type == "cpu"
             else fit_chunk(16 * M, device=dev, hi=4096, lo=16))

    scratch = _Scratch(dev)

    def normaliser(i0):  # per image: max of a*P and softmax's 1/sum (= Q at the argmax, exactly)
        i1 = min(i0 + rstep, U)
        x = scratch.take("a*P", i1 - i0, M)
        if lazy:
            P.rows(i0, i1, out=x).mul_(a)
        else:
            torch.mul(read_rows(P, i0, i1, dev, src_rows), a, out=x)
        mx[i0:i1] = x.amax(1, keepdim=True)
        q = torch.ops.aten._softmax.out(x, 1, False, out=scratch.take("softmax", i1 - i0, M))
        rinv[i0:i1] = q.amax(1, keepdim=True)

    if soft:
        # 0-based rank r gets membership p_r, computed as the reference does (float32)
        pr = (p_start - (torch.arange(0, top_k) / top_k * (p_start - p_end))).to(dev, torch.float32)
        if pr.min() < 0 or pr.max() > 1:
            raise NdUtilsError(f"soft_wpmi: memberships p_r must lie in [0, 1]; got p_start="
                               f"{p_start}, p_end={p_end}")
        # bag (k, r) = rows [i_r, ONE, ONE] with weights [p_r, 1, min_prob] of the table [Q - 1; 1]:
        # embedding_bag's multiply-add chain gives fl(fl(1 + fl(p_r * fl(Q - 1))) + min_prob),
        # exactly the reference's float32 rounding, in one pass instead of four
        ind = torch.stack([inv, torch.full_like(inv, U), torch.full_like(inv, U)], 2).view(-1)
        w = torch.stack([pr.expand(K, -1), torch.ones(K, top_k, device=dev),
                         torch.full((K, top_k), float(min_prob), device=dev)], 2).view(-1)
    step = (chunk_size or neuron_chunk(name, N, M, K, dev, top_k=top_k)
            or (16 if soft else 256))
    offsets = torch.arange(0, 3 * step * top_k, 3, device=dev)  # bags of 3 (soft_wpmi)
    out = torch.empty(K, M, device=dev)
    prior_out = torch.empty(M, device=dev)

    def block(bounds):
        m0, m1 = bounds
        table = scratch.take("table", U + soft, m1 - m0)
        Q = table[:U]
        if lazy:
            P.columns(m0, m1, out=Q).mul_(a)
        elif every:
            torch.mul(read_columns(P, m0, m1, dev), a, out=Q)
        elif local:
            torch.index_select(P[:, m0:m1], 0, rows, out=Q).mul_(a)
        else:
            torch.mul(read_columns(P, m0, m1, dev, src_rows), a, out=Q)
        Q.sub_(mx).exp_().mul_(rinv)                    # softmax(a*P)[rows, m0:m1], no [N, M]
        if soft:
            Q.sub_(1)
            table[U] = 1
            L = torch.empty(K, m1 - m0, device=dev)
            for k0 in range(0, K, step):
                c = min(step, K - k0)
                sl = slice(3 * k0 * top_k, 3 * (k0 + c) * top_k)
                x = F.embedding_bag(ind[sl], table, offsets[:c * top_k], mode="sum",
                                    per_sample_weights=w[sl])
                # log per term and torch.sum over ranks: the reference's order, hence its rounding
                torch.sum(x.log_().view(c, top_k, -1), 1, out=L[k0:k0 + c])
        else:
            Q.add_(min_prob).log_()                     # log(Q + min_prob), once per image
            L = torch.cat([F.embedding_bag(inv[k0:k0 + step], table, mode="sum")
                           for k0 in range(0, K, step)])
        pb = torch.logsumexp(L, 0) - math.log(K) if prior is None else prior[m0:m1]
        prior_out[m0:m1] = pb
        out[:, m0:m1] = L.sub_(lam * pb)

    with torch.no_grad(), _pool(dev, num_workers) as pmap:
        pmap(normaliser, range(0, U, rstep))
        pmap(block, _blocks(M))
    return (out, prior_out) if return_prior else out


def wpmi(clip_feats, target_feats, *, top_k=WPMI_TOP_K, a=2, lam=0.6, min_prob=1e-7,
         prior=None, return_prior=False, chunk_size=None, device=None, layer=None,
         num_workers=None):
    """Weighted pointwise mutual information over each neuron's top_k images -> [K, M].

    L[k, m] = sum over top images of log(softmax(a*P)[i, m] + min_prob); sim = L - lam * prior,
    prior[m] = logsumexp_k L[k, m] - log K over the neurons given, or the `prior` [M] passed in
    (off by default): store a whole layer's prior (`return_prior=True` returns (sim, prior)) and
    score any subset of its neurons exactly as in the whole-layer run. top_k > N is clamped to N
    with a warning (a small probe set still runs with the defaults).
    >>> wpmi(torch.rand(40, 5), torch.rand(40, 3)).shape
    torch.Size([3, 5])
    """
    return _pmi(clip_feats, target_feats, soft=False, top_k=top_k, a=a, lam=lam, min_prob=min_prob,
                p_start=1.0, p_end=1.0, prior=prior, return_prior=return_prior,
                chunk_size=chunk_size, device=device, layer=layer, num_workers=num_workers)


def soft_wpmi(clip_feats, target_feats, *, top_k=SOFT_WPMI_TOP_K, a=10, lam=1, min_prob=1e-7,
              p_start=0.998, p_end=0.97, prior=None, return_prior=False, chunk_size=None,
              device=None, layer=None, num_workers=None):
    """Soft WPMI (the default): rank r of a neuron's top_k images has membership p_r -> [K, M].

    L[k, m] = sum_r log(1 + p_r * (Q[i_r, m] - 1) + min_prob), Q = softmax(a*P) per image,
    p_r = p_start - r / top_k * (p_start - p_end); prior, return_prior and sim as in `wpmi`.
    >>> soft_wpmi(torch.rand(200, 5), torch.rand(200, 3)).shape
    torch.Size([3, 5])
    """
    return _pmi(clip_feats, target_feats, soft=True, top_k=top_k, a=a, lam=lam, min_prob=min_prob,
                p_start=p_start, p_end=p_end, prior=prior, return_prior=return_prior,
                chunk_size=chunk_size, device=device, layer=layer, num_workers=num_workers)
