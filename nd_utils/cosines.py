"""P = I @ T.T `[N, M]` by its factors: blocks of image-concept cosines computed as they are read.

The similarity functions (`nd_utils.similarity_formulas`) read P only by column blocks (and row blocks
for wpmi's normaliser). `factorized(image_features, text_features)` hands them a `Cosines`, whose
blocks are computed where they are read, so P is never formed whole (9 GB at the paper's
113,000 images and 20,000 concepts); `read_columns` / `read_rows` read a block of either
kind of P.

Example:
    >>> I, T = torch.rand(6, 4), torch.rand(3, 4)
    >>> factorized(I, T).shape
    torch.Size([6, 3])
"""
from __future__ import annotations

import torch

from .errors import NdUtilsError


class Cosines:
    """P = image_feats @ text_feats.T `[N, M]` as the similarity functions read it: by blocks of
    columns or rows, each computed when it is read, so that P is never formed whole.

    On the CPU a block is bit-identical to the same block of the dense product (MKL computes each
    entry alike whatever the shape), hence so are the similarities.
    >>> I, T = torch.rand(6, 4), torch.rand(3, 4)
    >>> torch.equal(Cosines(I, T).columns(1, 3), (I @ T.T)[:, 1:3])
    True
    """

    def __init__(self, image_feats, text_feats):
        I, T = torch.as_tensor(image_feats), torch.as_tensor(text_feats)
        if I.dim() != 2 or T.dim() != 2 or I.shape[1] != T.shape[1]:
            raise NdUtilsError(f"Cosines needs image features [N, D] and text features [M, D] of "
                               f"one D, got {tuple(I.shape)} and {tuple(T.shape)}")
        self.image_feats, self.text_feats = I, T.to(I.device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.image_feats.shape[0], self.text_feats.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.image_feats.device

    def dim(self) -> int:
        return 2

    def to(self, device, dtype=torch.float32) -> "Cosines":
        return Cosines(self.image_feats.detach().to(device, dtype),
                       self.text_feats.detach().to(device, dtype))

    # MKL rounds GEMMs of under 16 rows or 64 columns differently from the same entries of a
    # large product: narrower blocks are computed inside a wider window and cut out of it
    _ROWS, _COLS = 16, 64
    # On the CPU, MKL packs the long operand of a GEMM whole, per call: 200+ MB at 100,000
    # concepts or images, on each thread. Products are formed _CHUNK rows of it at a time
    # (same entries, bit for bit), which bounds the packing to ~32 MB.
    _CHUNK = 16384

    def _product(self, X: torch.Tensor, Y: torch.Tensor, out=None) -> torch.Tensor:
        """X @ Y.T `[n, m]` for X [n, D], Y [m, D], by chunks of the longer one's rows (CPU);
        into `out` (a contiguous [n, m]) when given."""
        n, m = X.shape[0], Y.shape[0]
        if X.device.type != "cpu" or max(n, m) <= self._CHUNK:
            return X @ Y.T if out is None else torch.mm(X, Y.T, out=out)
        if out is None:
            out = torch.empty(n, m, dtype=torch.result_type(X, Y), device=X.device)
        by_rows = n >= m
        length, least = (n, self._ROWS) if by_rows else (m, self._COLS)
        starts = list(range(0, length, self._CHUNK))
        if len(starts) > 1 and length - starts[-1] < least:  # a short tail joins its neighbour
            starts.pop()
        for s0, s1 in zip(starts, starts[1:] + [length]):
            if by_rows:
                torch.mm(X[s0:s1], Y.T, out=out[s0:s1])
            else:
                torch.mm(X, Y[s0:s1].T, out=out[:, s0:s1])
        return out

    def columns(self, m0: int, m1: int, rows: "torch.Tensor | None" = None,
                out: "torch.Tensor | None" = None) -> torch.Tensor:
        """P[:, m0:m1], or P[rows, m0:m1]; written into `out` (contiguous) when given, which
        lets a caller reuse one buffer for every block instead of allocating each."""
        I = self.image_feats if rows is None else self.image_feats.index_select(0, rows)
        lo = max(0, min(m0, m1 - self._COLS))            # widen to the left, else to the right
        hi = min(self.text_feats.shape[0], max(m1, lo + self._COLS))
        if (lo, hi) == (m0, m1):
            return self._product(I, self.text_feats[m0:m1], out)
        return _into(self._product(I, self.text_feats[lo:hi])[:, m0 - lo:m1 - lo], out)

    def rows(self, i0: int, i1: int, rows: "torch.Tensor | None" = None,
             out: "torch.Tensor | None" = None) -> torch.Tensor:
        """P[i0:i1], or P[rows[i0:i1]]; into `out` when given, as `columns`."""
        N = self.image_feats.shape[0]
        sel = torch.arange(i0, min(i1, N), device=self.device) if rows is None else rows[i0:i1]
        n = sel.numel()
        if rows is None and n >= self._ROWS:
            return self._product(self.image_feats[i0:i1], self.text_feats, out)
        if n < self._ROWS <= N:  # pad with copies of the first row, cut them off again
            sel = torch.cat([sel, sel[:1].expand(self._ROWS - n)])
        return _into(self._product(self.image_feats.index_select(0, sel), self.text_feats)[:n], out)

    def dense(self) -> torch.Tensor:
        return self.image_feats @ self.text_feats.T


def _into(block: torch.Tensor, out: "torch.Tensor | None") -> torch.Tensor:
    return block if out is None else out.copy_(block)


def factorized(image_features, text_features) -> Cosines:
    """P = image_features @ text_features.T `[N, M]`, given by its factors: what every similarity
    function accepts in place of a dense P, computing the blocks it reads on its own device.

    image_features [N, D], text_features [M, D] (L2-normalised rows for cosines). The result is
    the same as with the dense P on the CPU (bit for bit) and never holds more than a block:
    the pipeline's stages 02, 07 and 08 pass P this way.
    >>> from nd_utils.similarity_formulas import soft_wpmi
    >>> I, T, A = torch.rand(60, 8), torch.rand(5, 8), torch.rand(60, 3)
    >>> torch.equal(soft_wpmi(factorized(I, T), A, top_k=10), soft_wpmi(I @ T.T, A, top_k=10))
    True
    """
    return Cosines(image_features, text_features)


def read_columns(P, m0, m1, dev, rows=None):
    """P[:, m0:m1] (P[rows, m0:m1]) on dev: computed (a Cosines), a view (a dense P on dev) or
    a copy (a dense P elsewhere; `rows` then lives with P)."""
    if isinstance(P, Cosines):
        return P.columns(m0, m1, rows)
    x = P[:, m0:m1] if rows is None else P[:, m0:m1].index_select(0, rows)
    return x.to(dev)


def read_rows(P, i0, i1, dev, rows=None):
    """P[i0:i1] (P[rows[i0:i1]]) on dev, as `read_columns`."""
    if isinstance(P, Cosines):
        return P.rows(i0, i1, rows)
    return (P[i0:i1] if rows is None else P.index_select(0, rows[i0:i1])).to(dev)
