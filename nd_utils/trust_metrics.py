"""Held-out trust of neuron labels, vectorised over neurons: tensors in, tensors out.

A label is trusted when the vision-language model, given the label alone, predicts the neuron's
activations on images the label was not chosen on better than chance:

- `heldout_correlations`: Pearson r between the simulated activations
  `sigmoid(a * (cos(image, label) + b))` (Linear Explanations' simulator) and the real ones, one
  r per neuron, on held-out images `[H]`;
- `null_correlations` + `permutation_p`: the same r for R random concepts of the concept set
  gives a permutation p-value per neuron, `(1 + #{null r >= r}) / (1 + R)`;
- `benjamini_hochberg`: q-values over a layer's neurons (a label is trusted at q < alpha);
- `cosy_auc`: CoSy's AUC of the neuron's activations on images of its label against held-out
  natural images, by ranks (ties count one half), for every neuron at once.

Every function works on column blocks of `chunk` neurons, so memory is bounded by
`[H, chunk]` (and `[chunk, R]`), never `[H, K]` copies beyond the caller's own.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> feats = torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=1)
    >>> label = feats[:1]                  # neuron 0 fires on images like image 0
    >>> acts = (feats @ label.T) + 0.1 * torch.randn(200, 1, generator=g)
    >>> bool(heldout_correlations(feats, label, acts, a=5.0, b=0.0)[0] > 0.9)
    True
"""
from __future__ import annotations

import math

import torch

CHUNK = 256  # neurons per block


def simulate(cosines: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Simulated activations `sigmoid(a * (cosines + b))`, same shape as `cosines`."""
    return torch.sigmoid(float(a) * (cosines.double() + float(b)))


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Columns of `x [H, C]` centred and scaled so that `z1.T @ z2` is Pearson's r; a constant
    column (no variance: a dead neuron, a saturated prediction) becomes NaN."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    norm = x.norm(dim=0, keepdim=True)
    # float rounding leaves a tiny norm for a constant column: treat it as zero
    tiny = norm <= 1e-12 * (1 + x.abs().amax(0, keepdim=True)) * math.sqrt(max(x.shape[0], 1))
    return (x / norm).masked_fill(tiny, float("nan"))


def heldout_correlations(image_feats: torch.Tensor, label_text: torch.Tensor,
                         activations: torch.Tensor, a: float, b: float,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Pearson r per neuron between simulated and real activations on held-out images.

    image_feats `[H, D]` and label_text `[K, D]` unit-norm (label_text[k] is neuron k's label),
    activations `[H, K]`; returns `[K]` float64, NaN where either side is constant.
    """
    H, K = activations.shape
    out = torch.empty(K, dtype=torch.float64)
    for k0 in range(0, K, chunk):
        k1 = min(k0 + chunk, K)
        pred = _standardise(simulate(image_feats.float() @ label_text[k0:k1].float().T, a, b))
        real = _standardise(activations[:, k0:k1])
        out[k0:k1] = (pred * real).sum(0)
    return out.clamp_(-1, 1)


def null_correlations(image_feats: torch.Tensor, null_text: torch.Tensor,
                      activations: torch.Tensor, a: float, b: float,
                      chunk: int = CHUNK) -> torch.Tensor:
    """r of R random concepts' simulated activations with every neuron: `[K, R]` float64.

    null_text `[R, D]` unit-norm; the R predictions are shared by all neurons (one draw of
    concepts per layer), so this is one `[K, H] @ [H, R]` product per block of neurons.
    """
    K = activations.shape[1]
    pred = _standardise(simulate(image_feats.float() @ null_text.float().T, a, b))   # [H, R]
    out = torch.empty(K, null_text.shape[0], dtype=torch.float64)
    for k0 in range(0, K, chunk):
        k1 = min(k0 + chunk, K)
        out[k0:k1] = _standardise(activations[:, k0:k1]).T @ pred
    return out.clamp_(-1, 1)


def permutation_p(r: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """One-sided permutation p-value per neuron: `(1 + #{null >= r}) / (1 + #finite null)`.

    r `[K]`, null `[K, R]`; NaN where r is NaN (a dead neuron has no trust). NaN nulls (a
    constant prediction) are left out of both counts.
    >>> permutation_p(torch.tensor([0.5, 0.0]), torch.tensor([[0.1, 0.2, 0.6], [0.1, 0.2, 0.6]]))
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    r, null = r.double(), null.double()
    finite = torch.isfinite(null)
    above = ((null >= r[:, None]) & finite).sum(1)
    p = (1 + above).double() / (1 + finite.sum(1)).double()
    return p.masked_fill(~torch.isfinite(r), float("nan"))


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """Benjamini-Hochberg adjusted p-values (q) of `p [K]`; NaN stays NaN and counts as a test
    with p = 1 (a neuron without a score is one of the K hypotheses, never a discovery).
    >>> [round(q, 4) for q in benjamini_hochberg(torch.tensor([0.01, 0.04, 0.03, 0.5])).tolist()]
    [0.04, 0.0533, 0.0533, 0.5]
    """
    p = p.double()
    filled = torch.where(torch.isfinite(p), p, torch.ones_like(p))
    n = filled.numel()
    order = torch.argsort(filled, stable=True)
    scaled = filled[order] * n / torch.arange(1, n + 1, dtype=torch.float64)
    # running minimum from the largest p down
    q_sorted = torch.flip(torch.cummin(torch.flip(scaled, [0]), 0).values, [0]).clamp_(max=1)
    q = torch.empty_like(filled)
    q[order] = q_sorted
    return q.masked_fill(~torch.isfinite(p), float("nan"))


def cosy_auc(control: torch.Tensor, concept: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """CoSy AUC per neuron: P(concept activation > control activation) + 1/2 P(equal).

    control `[H, K]` (held-out natural images), concept `[Q, K]` (column k: neuron k's
    activations on the Q images of its own label); returns `[K]` float64, NaN for an empty side.
    Counts come from `searchsorted` on each neuron's sorted control column: O((H + Q) log H).
    """
    H, K = control.shape
    Q = concept.shape[0]
    out = torch.full((K,), float("nan"), dtype=torch.float64)
    if H == 0 or Q == 0:
        return out
    for k0 in range(0, K, chunk):
        k1 = min(k0 + chunk, K)
        ctrl = torch.sort(control[:, k0:k1].double().T.contiguous(), dim=1).values    # [k, H]
        vals = concept[:, k0:k1].double().T.contiguous()                                # [k, Q]
        below = torch.searchsorted(ctrl, vals, side="left")
        upto = torch.searchsorted(ctrl, vals, side="right")
        out[k0:k1] = (below + upto).sum(1).double() / (2.0 * H * Q)
    return out
