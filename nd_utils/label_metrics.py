"""Metrics of the neuron-label quality suite: CoSy scores, simulation calibration, statistics.

CoSy (NeurIPS 2024) compares a neuron's activations on control images with those on images
generated for its label: `roc_auc`, `average_precision`, `mad`, `mann_whitney_p`, `cosy_scores`.
The Linear Explanations (ICML 2024) simulator predicts activations as sigmoid(a * (cos + b)) of
image-concept cosines: `fit_sigmoid_calibration`, `simulate_activations`, scored with `pearson`.
NeuronEval-style sanity checks compare methods over neurons: `bootstrap_mean_ci`,
`paired_comparison`, `sanity_ordering`. Inputs may be array-likes or CPU torch tensors.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import special
# scipy.stats is imported inside the functions that use it: it takes about a second to import,
# which every notebook kernel would pay on `import nd_utils`

_L2 = 1e-6  # penalty on the slope, sklearn's C=1e6: keeps separable data at a finite optimum


def _vector(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


def _two_samples(control, concept) -> "tuple[np.ndarray, np.ndarray]":
    """Both samples flat float64 (possibly views of the caller's arrays), non-empty, NaN-free."""
    out = []
    for x, name in ((control, "control"), (concept, "concept")):
        v = _vector(x)
        if v.size == 0:
            raise ValueError(f"{name} activations are empty: both samples need at least one value")
        if np.isnan(v).any():
            raise ValueError(f"{name} activations contain NaN")
        out.append(v)
    return out[0], out[1]


def roc_auc(control, concept) -> float:
    """ROC AUC of concept (label 1) against control (label 0) scores; ties count one half.

    control [n0], concept [n1] (any shape, flattened). Equals Mann-Whitney U / (n0 * n1).

    >>> roc_auc([0.0, 1.0, 2.0], [1.0, 3.0])
    0.75
    """
    control, concept = _two_samples(control, concept)
    from scipy import stats
    ranks = stats.rankdata(np.concatenate([control, concept]))
    n0, n1 = control.size, concept.size
    u = ranks[n0:].sum() - n1 * (n1 + 1) / 2
    return float(u / (n0 * n1))


def average_precision(control, concept) -> float:
    """Area under the precision-recall curve as sklearn's `average_precision_score` computes it.

    control [n0], concept [n1]. Sum over distinct scores t (descending) of (R_t - R_prev) * P_t,
    where R_t and P_t count the samples scoring >= t, so tied scores enter together.

    >>> average_precision([0.0, 1.0, 2.0], [1.0, 3.0])
    0.75
    """
    control, concept = _two_samples(control, concept)
    thresholds = np.unique(np.concatenate([control, concept]))[::-1]
    control, concept = np.sort(control), np.sort(concept)  # copies: inputs may be the caller's
    tps = concept.size - np.searchsorted(concept, thresholds, side="left")
    fps = control.size - np.searchsorted(control, thresholds, side="left")
    precision = tps / (tps + fps)
    recall = tps / concept.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mad(control, concept) -> float:
    """CoSy's Mean Activation Difference: (mean(concept) - mean(control)) / std(control).

    control [n0], concept [n1]; std with ddof=0 as in CoSy's code. nan when control is constant
    (the difference has no scale).

    >>> mad([0.0, 2.0], [4.0])
    3.0
    """
    control, concept = _two_samples(control, concept)
    sd = control.std()
    if sd == 0:
        return math.nan
    return float((concept.mean() - control.mean()) / sd)


def mann_whitney_p(control, concept) -> float:
    """One-sided Mann-Whitney p-value that concept activations are larger than control ones.

    control [n0], concept [n1]; scipy's mannwhitneyu(concept, control, alternative="greater").

    >>> round(mann_whitney_p([0.0, 1.0, 2.0], [3.0, 4.0, 5.0]), 4)
    0.05
    """
    control, concept = _two_samples(control, concept)
    from scipy import stats
    return float(stats.mannwhitneyu(concept, control, alternative="greater").pvalue)


def cosy_scores(control, concept) -> dict:
    """All CoSy scores of one neuron: auc, mad, auprc, p_value, n_control, n_concept.

    >>> s = cosy_scores([0.0, 1.0, 2.0], [1.0, 3.0])
    >>> s["auc"], s["n_control"], s["n_concept"]
    (0.75, 3, 2)
    """
    control, concept = _two_samples(control, concept)
    return {"auc": roc_auc(control, concept), "mad": mad(control, concept),
            "auprc": average_precision(control, concept),
            "p_value": mann_whitney_p(control, concept),
            "n_control": int(control.size), "n_concept": int(concept.size)}


def pearson(x, y) -> float:
    """Pearson correlation of x [n] and y [n]; nan, silently, if n < 2, a side is constant or NaN.

    >>> pearson([1, 2, 3], [2, 4, 7])
    0.9933992677987828
    >>> pearson([1, 1, 1], [2, 4, 7])
    nan
    """
    x, y = _vector(x), _vector(y)
    if x.size != y.size:
        raise ValueError(f"pearson needs equal lengths, got {x.size} and {y.size}")
    # ptp rather than a zero norm: x - mean(x) of a constant can be a few ulps off zero.
    if x.size < 2 or not (np.ptp(x) > 0 and np.ptp(y) > 0):
        return math.nan
    xm, ym = x - x.mean(), y - y.mean()
    # Scaling by the largest deviation first keeps the sums of squares from overflowing.
    xm, ym = xm / np.abs(xm).max(), ym / np.abs(ym).max()
    r = np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym))
    return float(np.clip(r, -1.0, 1.0))


def fit_sigmoid_calibration(cosines, positives, *, max_iter: int = 200) -> "tuple[float, float]":
    """Maximum-likelihood (a, b) of p = sigmoid(a * (cos + b)) for the simulator.

    cosines [n_images, n_concepts] float, positives same shape bool (True where the image shows
    the concept). Logistic regression logit = w * cos + c by damped Newton steps with a 1e-6 L2
    penalty on w (sklearn's C=1e6); returns a = w, b = c / w.

    >>> a, b = fit_sigmoid_calibration([0.1, 0.2, 0.3, 0.4], [False, True, False, True])
    >>> round(a, 2), round(b, 2)
    (9.08, -0.25)
    """
    x = _vector(cosines)
    y = np.asarray(positives, dtype=bool).ravel()
    if x.size != y.size:
        raise ValueError(f"cosines and positives differ in size: {x.size} vs {y.size}")
    if not np.isfinite(x).all():
        raise ValueError("cosines contain NaN or inf")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError("positives needs both True and False entries to fit a calibration")
    if np.ptp(x) == 0:
        raise ValueError("all cosines are equal: the slope a is 0 and b is undefined")
    yf = y.astype(np.float64)

    def loss(w, c):
        z = w * x + c
        return np.logaddexp(0.0, z).sum() - np.dot(yf, z) + 0.5 * _L2 * w * w

    # Start at the intercept-only optimum so the first step is already well scaled.
    w, c = 0.0, math.log(n_pos / (y.size - n_pos))
    f = loss(w, c)
    for _ in range(max_iter):
        p = special.expit(w * x + c)
        r, s = p - yf, p * (1.0 - p)
        sx = s * x
        g = np.array([np.dot(r, x) + _L2 * w, r.sum()])
        h = np.array([[np.dot(sx, x) + _L2, sx.sum()], [sx.sum(), s.sum()]])
        step = np.linalg.solve(h, g)
        # Full Newton steps overshoot where the loss is far from quadratic (nearly separable
        # data); halving until the convex loss decreases keeps every iterate an improvement.
        t = 1.0
        while True:
            w_new, c_new = w - t * step[0], c - t * step[1]
            f_new = loss(w_new, c_new)
            if f_new <= f or t < 1e-10:
                break
            t *= 0.5
        done = abs(w_new - w) <= 1e-10 * (1 + abs(w)) and abs(c_new - c) <= 1e-10 * (1 + abs(c))
        if f_new <= f:
            w, c, f = w_new, c_new, f_new
        if done or t < 1e-10:
            break
    else:
        warnings.warn(f"fit_sigmoid_calibration: no convergence in {max_iter} Newton steps",
                      RuntimeWarning, stacklevel=2)
    if w == 0:
        raise ValueError("fitted slope a is 0: cosines do not separate positives, b is undefined")
    return float(w), float(c / w)


def fit_simulator_on_classes(cosines, image_labels, concepts) -> "tuple[float, float]":
    """(a, b) of the simulator fitted on labelled images: cosines `[n_images, n_concepts]`
    between the images and the class names `concepts`; image i is a positive of concept j
    when `image_labels[i] == concepts[j]` (as Linear Explanations calibrates on class labels).

    >>> a, b = fit_simulator_on_classes([[0.4, 0.1], [0.2, 0.3]], ["cat", "dog"], ["cat", "dog"])
    >>> a > 0
    True
    """
    pos = np.array([[lab == c for c in concepts] for lab in image_labels])
    return fit_sigmoid_calibration(cosines, pos)


def simulate_activations(cosines, a: float, b: float) -> np.ndarray:
    """Simulated activations sigmoid(a * (cos + b)), same shape as cosines, overflow-free.

    >>> simulate_activations([0.25, 0.5], 4.0, -0.25)
    array([0.5       , 0.73105858])
    """
    cos = np.asarray(cosines)
    if not np.issubdtype(cos.dtype, np.floating):
        cos = cos.astype(np.float64)
    return special.expit(a * (cos + b))


def bootstrap_mean_ci(values, *, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> "tuple[float, float, float]":
    """(mean, low, high): percentile bootstrap interval of the mean of values [n], NaN dropped.

    All NaN or empty -> (nan, nan, nan); one value v -> (v, v, v).

    >>> bootstrap_mean_ci([1.0, float("nan")])
    (1.0, 1.0, 1.0)
    >>> m, lo, hi = bootstrap_mean_ci([1.0, 2.0, 3.0, 4.0])
    >>> lo <= m == 2.5 <= hi
    True
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    v = _vector(values)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    rng, means = np.random.default_rng(seed), np.empty(n_boot)
    block = max(1, 4_000_000 // v.size)  # resamples per block: ~4M indices whatever len(v)
    for i in range(0, n_boot, block):
        k = min(block, n_boot - i)
        means[i:i + k] = v[rng.integers(0, v.size, size=(k, v.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


def _sign_flip_p(d: np.ndarray, n_random: int, seed: int) -> float:
    """Two-sided sign-flip p of the mean of d: exact for n <= 16, else (1 + hits) / (1 + draws)."""
    n, observed = d.size, abs(d.sum())
    # Sums that are equal in exact arithmetic can differ in the last bits when summed in another
    # order; the tolerance keeps such ties counted.
    tol = 1e-9 * np.abs(d).sum()
    if n <= 16:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        sums = (1 - 2 * bits) @ d
        return float(np.mean(np.abs(sums) >= observed - tol))
    # A stream distinct from the bootstrap's, which uses default_rng(seed).
    rng = np.random.default_rng([seed, 1])
    block = max(1, 2_000_000 // n)
    hits = 0
    for i in range(0, n_random, block):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(min(block, n_random - i), n))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + n_random)


def paired_comparison(a, b, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Compare paired per-neuron values a [n] and b [n]; pairs with a NaN are dropped.

    Returns mean_a, mean_b, diff (mean of a - b), diff_low/diff_high (percentile bootstrap,
    = bootstrap_mean_ci(a - b)), p_wilcoxon (two-sided; nan with fewer than 2 non-zero
    differences), p_permutation (two-sided sign flips of the mean difference; exact for n <= 16,
    else 20000 seeded draws; 1.0 when all differences are 0) and n. No pairs -> nan, n = 0.

    >>> r = paired_comparison([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    >>> r["diff"], r["p_permutation"], r["n"]
    (2.0, 0.25, 3)
    """
    a, b = _vector(a), _vector(b)
    if a.size != b.size:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    d = a - b
    if d.size == 0:
        keys = ("mean_a", "mean_b", "diff", "diff_low", "diff_high", "p_wilcoxon", "p_permutation")
        return {**dict.fromkeys(keys, math.nan), "n": 0}
    diff, low, high = bootstrap_mean_ci(d, n_boot=n_boot, seed=seed, level=level)
    from scipy import stats
    p_w = float(stats.wilcoxon(d).pvalue) if np.count_nonzero(d) >= 2 else math.nan
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff": diff,
            "diff_low": low, "diff_high": high, "p_wilcoxon": p_w,
            "p_permutation": _sign_flip_p(d, 20000, seed), "n": int(d.size)}


def sanity_ordering(means: "dict[str, float]", order: "list[str]") -> "list[dict]":
    """Check that consecutive entries of order (best first) have decreasing means.

    Names absent from means are skipped. One record per consecutive pair: higher, lower,
    higher_value, lower_value, ok (higher_value > lower_value; False if either is NaN).

    >>> sanity_ordering({"true class": 0.9, "method": 0.5, "constant": 0.6},
    ...                 ["true class", "method", "shuffled", "constant"])[1]["ok"]
    False
    """
    present = [name for name in order if name in means]
    pairs = [(hi, lo, float(means[hi]), float(means[lo])) for hi, lo in zip(present, present[1:])]
    return [{"higher": hi, "lower": lo, "higher_value": hv, "lower_value": lv, "ok": bool(hv > lv)}
            for hi, lo, hv, lv in pairs]
