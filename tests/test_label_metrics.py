"""Tests of nd_utils.label_metrics against scikit-learn / scipy references and hand examples."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from nd_utils import label_metrics as lm

sk_metrics = pytest.importorskip("sklearn.metrics")


def _fixtures():
    """(control, concept) pairs: continuous, heavy integer ties, unequal sizes, separated."""
    rng = np.random.default_rng(123)
    yield rng.normal(size=50), rng.normal(0.5, 1.0, size=50)
    yield rng.integers(0, 4, size=200).astype(float), rng.integers(1, 5, size=37).astype(float)
    yield rng.integers(0, 2, size=7).astype(float), rng.integers(0, 3, size=300).astype(float)
    yield rng.normal(size=1000), rng.normal(1.0, 2.0, size=3)
    yield rng.normal(size=20), rng.normal(10.0, 1.0, size=20)
    yield np.full(5, 2.0), np.full(4, 2.0)


FIXTURES = list(_fixtures())


def _labels(control, concept):
    return np.r_[np.zeros(len(control)), np.ones(len(concept))], np.r_[control, concept]


@pytest.mark.parametrize("control, concept", FIXTURES)
def test_roc_auc_matches_sklearn_and_mann_whitney_u(control, concept):
    y, s = _labels(control, concept)
    auc = lm.roc_auc(control, concept)
    assert auc == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
    u = stats.mannwhitneyu(concept, control).statistic
    assert auc == pytest.approx(u / (len(control) * len(concept)), abs=1e-12)


@pytest.mark.parametrize("control, concept", FIXTURES)
def test_average_precision_matches_sklearn(control, concept):
    y, s = _labels(control, concept)
    assert lm.average_precision(control, concept) == pytest.approx(
        sk_metrics.average_precision_score(y, s), abs=1e-12)


def test_two_sample_metrics_accept_tensors_and_reject_bad_input():
    torch = pytest.importorskip("torch")
    control, concept = FIXTURES[0]
    assert lm.roc_auc(torch.tensor(control), torch.tensor(concept)) == lm.roc_auc(control, concept)
    for fn in (lm.roc_auc, lm.average_precision, lm.mad, lm.mann_whitney_p, lm.cosy_scores):
        with pytest.raises(ValueError, match="control activations are empty"):
            fn([], [1.0])
        with pytest.raises(ValueError, match="concept activations are empty"):
            fn([1.0], [])
        with pytest.raises(ValueError, match="NaN"):
            fn([1.0, math.nan], [2.0])


def test_average_precision_perfect_and_inputs_untouched():
    control, concept = np.array([0.3, 0.1, 0.2]), np.array([0.9, 0.5])
    assert lm.average_precision(control, concept) == 1.0
    assert lm.roc_auc(control, concept) == 1.0
    # The implementation sorts its own copies, never the caller's arrays.
    assert control.tolist() == [0.3, 0.1, 0.2] and concept.tolist() == [0.9, 0.5]


def test_mad_by_hand():
    control, concept = [1.0, 2.0, 3.0, 6.0], [5.0, 7.0]
    sd = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4)  # ddof = 0
    assert lm.mad(control, concept) == pytest.approx((6.0 - 3.0) / sd)
    assert lm.mad(concept, control) == pytest.approx((3.0 - 6.0) / 1.0)
    assert math.isnan(lm.mad([2.0, 2.0], [3.0]))


def test_mann_whitney_p_matches_scipy_and_direction():
    rng = np.random.default_rng(5)
    control, concept = rng.normal(size=100), rng.normal(2.0, 1.0, size=30)
    expected = stats.mannwhitneyu(concept, control, alternative="greater").pvalue
    assert lm.mann_whitney_p(control, concept) == pytest.approx(expected, rel=1e-12)
    assert lm.mann_whitney_p(control, concept) < 1e-8
    assert lm.mann_whitney_p(concept, control) > 0.99
    # Tiny samples go through scipy's exact method.
    assert lm.mann_whitney_p([0.0, 1.0, 2.0], [3.0, 4.0, 5.0]) == pytest.approx(1 / 20)


def test_cosy_scores_combines_the_metrics():
    control, concept = FIXTURES[1]
    scores = lm.cosy_scores(control, concept)
    assert set(scores) == {"auc", "mad", "auprc", "p_value", "n_control", "n_concept"}
    assert scores["auc"] == lm.roc_auc(control, concept)
    assert scores["mad"] == lm.mad(control, concept)
    assert scores["auprc"] == lm.average_precision(control, concept)
    assert scores["p_value"] == lm.mann_whitney_p(control, concept)
    assert (scores["n_control"], scores["n_concept"]) == (200, 37)


def test_pearson_matches_scipy():
    rng = np.random.default_rng(7)
    for n in (2, 3, 50, 1000):
        x = rng.normal(size=n)
        y = 0.3 * x + rng.normal(size=n)
        assert lm.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    big = rng.normal(size=100) * 1e200  # squared sums overflow without normalising first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lm.pearson(big, 2 * big) == pytest.approx(1.0)
        assert lm.pearson(big, -big + 1e199) == pytest.approx(-1.0)


def test_pearson_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(lm.pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]))
        assert math.isnan(lm.pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
        assert math.isnan(lm.pearson([1.0], [2.0]))
        assert math.isnan(lm.pearson([], []))
        assert math.isnan(lm.pearson([1.0, math.nan, 3.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="equal lengths"):
        lm.pearson([1.0, 2.0], [1.0, 2.0, 3.0])


def test_fit_sigmoid_calibration_recovers_generating_parameters():
    rng = np.random.default_rng(0)
    a, b = 20.0, -0.25
    cos = rng.uniform(0.0, 0.5, size=(500, 100))
    positives = rng.random(cos.shape) < lm.simulate_activations(cos, a, b)
    fa, fb = lm.fit_sigmoid_calibration(cos, positives)
    assert fa == pytest.approx(a, rel=0.05)
    assert fb == pytest.approx(b, abs=0.01)


def _imbalanced_fixture(seed=1, n_images=120, n_concepts=1000):
    """One positive concept per image whose cosine is a bit above the rest, with overlap."""
    rng = np.random.default_rng(seed)
    cos = rng.normal(0.2, 0.03, size=(n_images, n_concepts))
    true = rng.integers(0, n_concepts, size=n_images)
    cos[np.arange(n_images), true] += rng.normal(0.08, 0.03, size=n_images)
    positives = np.zeros(cos.shape, dtype=bool)
    positives[np.arange(n_images), true] = True
    return cos, positives


def test_fit_sigmoid_calibration_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    cos, positives = _imbalanced_fixture()
    model = LogisticRegression(C=1e6, solver="newton-cholesky", tol=1e-12, max_iter=500)
    model.fit(cos.reshape(-1, 1), positives.ravel())
    w, c = model.coef_[0, 0], model.intercept_[0]
    a, b = lm.fit_sigmoid_calibration(cos, positives)
    assert a == pytest.approx(w, rel=1e-5)
    assert b == pytest.approx(c / w, rel=1e-5)
    assert a > 0 and positives.sum() == 120


def test_fit_sigmoid_calibration_separable_and_tensor_input():
    torch = pytest.importorskip("torch")
    cos = torch.tensor([[0.1, 0.2, 0.8], [0.15, 0.9, 0.05]], dtype=torch.float32)
    positives = cos > 0.5
    from sklearn.linear_model import LogisticRegression

    a, b = lm.fit_sigmoid_calibration(cos, positives)
    # Perfect separation: only the tiny L2 (sklearn's C=1e6) keeps the slope finite.
    model = LogisticRegression(C=1e6, solver="newton-cholesky", tol=1e-12, max_iter=500)
    model.fit(cos.numpy().reshape(-1, 1).astype(np.float64), positives.numpy().ravel())
    w, c = model.coef_[0, 0], model.intercept_[0]
    assert a == pytest.approx(w, rel=1e-6) and b == pytest.approx(c / w, rel=1e-6)
    assert a > 20 and -b == pytest.approx(0.5, abs=0.05)
    sim = lm.simulate_activations(cos.numpy(), a, b)
    assert np.all(sim[positives.numpy()] > 0.99) and np.all(sim[~positives.numpy()] < 0.01)


def test_fit_sigmoid_calibration_errors():
    cos = np.random.default_rng(2).uniform(size=(4, 5))
    with pytest.raises(ValueError, match="both True and False"):
        lm.fit_sigmoid_calibration(cos, np.zeros(cos.shape, dtype=bool))
    with pytest.raises(ValueError, match="both True and False"):
        lm.fit_sigmoid_calibration(cos, np.ones(cos.shape, dtype=bool))
    with pytest.raises(ValueError, match="differ in size"):
        lm.fit_sigmoid_calibration(cos, np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="all cosines are equal"):
        lm.fit_sigmoid_calibration(np.full((2, 2), 0.3), np.eye(2, dtype=bool))
    cos, positives = _imbalanced_fixture(n_images=20, n_concepts=50)
    with pytest.warns(RuntimeWarning, match="no convergence in 1 Newton steps"):
        lm.fit_sigmoid_calibration(cos, positives, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default budget converges silently
        lm.fit_sigmoid_calibration(cos, positives)


def test_simulate_activations_stable_and_shaped():
    cos = np.array([[-1.0, 0.0], [0.5, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = lm.simulate_activations(cos, 1e4, -0.5)
    assert out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[0.0, 0.0], [0.5, 1.0]])
    assert lm.simulate_activations(cos.astype(np.float32), 2.0, 0.1).dtype == np.float32
    np.testing.assert_allclose(lm.simulate_activations(cos, 2.0, 0.1),
                               1 / (1 + np.exp(-2.0 * (cos + 0.1))))


def test_bootstrap_mean_ci_deterministic_contains_mean_and_shrinks():
    rng = np.random.default_rng(3)
    small, large = rng.normal(1.0, 1.0, size=20), rng.normal(1.0, 1.0, size=2000)
    first = lm.bootstrap_mean_ci(small, seed=4)
    assert first == lm.bootstrap_mean_ci(small, seed=4)
    assert first != lm.bootstrap_mean_ci(small, seed=5)
    m, lo, hi = first
    assert m == pytest.approx(small.mean()) and lo < m < hi
    m2, lo2, hi2 = lm.bootstrap_mean_ci(large, seed=4)
    assert lo2 < m2 < hi2 and (hi2 - lo2) < (hi - lo) / 5
    # Normal-theory half width 1.96 * sd / sqrt(n) as a sanity bound on the percentile interval.
    half = 1.96 * large.std() / math.sqrt(large.size)
    assert (hi2 - lo2) / 2 == pytest.approx(half, rel=0.15)
    m90, lo90, hi90 = lm.bootstrap_mean_ci(small, seed=4, level=0.9)
    assert lo <= lo90 and hi90 <= hi


def test_bootstrap_mean_ci_nan_handling():
    with_nan = lm.bootstrap_mean_ci([1.0, math.nan, 3.0, 2.0], seed=1)
    assert with_nan == lm.bootstrap_mean_ci([1.0, 3.0, 2.0], seed=1)
    assert all(math.isnan(v) for v in lm.bootstrap_mean_ci([math.nan, math.nan]))
    assert all(math.isnan(v) for v in lm.bootstrap_mean_ci([]))
    assert lm.bootstrap_mean_ci([math.nan, 0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError, match="level"):
        lm.bootstrap_mean_ci([1.0, 2.0], level=1.0)


def test_paired_comparison_matches_scipy_and_bootstrap():
    rng = np.random.default_rng(8)
    a = rng.normal(0.5, 0.2, size=60)
    b = a - rng.normal(0.05, 0.1, size=60)
    a[3], b[10] = math.nan, math.nan
    r = lm.paired_comparison(a, b, seed=2)
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    assert r["n"] == 58
    assert r["mean_a"] == pytest.approx(a[keep].mean())
    assert r["mean_b"] == pytest.approx(b[keep].mean())
    assert r["diff"] == pytest.approx(d.mean())
    assert (r["diff"], r["diff_low"], r["diff_high"]) == lm.bootstrap_mean_ci(d, seed=2)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
    # 20000 random sign flips agree with scipy's own randomised sign-flip test.
    ref = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=20000,
                                 alternative="two-sided", random_state=0).pvalue
    assert r["p_permutation"] == pytest.approx(ref, abs=0.01)
    assert r == lm.paired_comparison(a, b, seed=2)


def test_paired_comparison_exact_permutation_by_hand():
    r = lm.paired_comparison([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # diffs 1, 2, 3
    # Sign-flipped sums: +-1 +-2 +-3 in {6, 4, 2, 0, 0, -2, -4, -6}; |sum| >= 6 twice.
    assert r["p_permutation"] == 2 / 8
    assert r["diff"] == 2.0 and r["n"] == 3
    # The observed sum is a rounding residue (~1e-17) and some flipped sums are exactly 0: all
    # 16 patterns tie at |sum| = 0 and must count (a strict >= without tolerance gives 14/16).
    r = lm.paired_comparison([-0.4, 0.1, 0.1, 0.2], [0.0, 0.0, 0.0, 0.0])
    assert r["p_permutation"] == 1.0
    # Exact agrees with scipy's exact sign-flip test for n <= 16.
    d = np.random.default_rng(9).normal(0.3, 1.0, size=12)
    ref = stats.permutation_test((d,), np.mean, permutation_type="samples",
                                 alternative="two-sided").pvalue
    assert lm.paired_comparison(d, np.zeros(12))["p_permutation"] == pytest.approx(ref)


def test_paired_comparison_identical_and_degenerate_inputs():
    x = [0.2, 0.5, 0.9, 0.4]
    r = lm.paired_comparison(x, x)
    assert r["diff"] == 0.0 and r["diff_low"] == 0.0 and r["diff_high"] == 0.0
    assert math.isnan(r["p_wilcoxon"]) and r["p_permutation"] == 1.0
    assert math.isnan(lm.paired_comparison([1.0, 2.0], [1.0, 1.0])["p_wilcoxon"])
    empty = lm.paired_comparison([math.nan], [1.0])
    assert empty["n"] == 0 and math.isnan(empty["diff"]) and math.isnan(empty["p_permutation"])
    with pytest.raises(ValueError, match="equal lengths"):
        lm.paired_comparison([1.0], [1.0, 2.0])


def test_sanity_ordering_pass_fail_and_nan():
    order = ["true class", "method", "shuffled", "constant"]
    good = lm.sanity_ordering({"true class": 0.9, "method": 0.6, "shuffled": 0.3,
                               "constant": 0.1}, order)
    assert [(r["higher"], r["lower"]) for r in good] == list(zip(order, order[1:]))
    assert all(r["ok"] for r in good)
    bad = lm.sanity_ordering({"true class": 0.9, "shuffled": 0.95, "constant": math.nan}, order)
    assert [(r["higher"], r["lower"], r["ok"]) for r in bad] == [
        ("true class", "shuffled", False), ("shuffled", "constant", False)]
    assert bad[0]["higher_value"] == 0.9 and bad[0]["lower_value"] == 0.95
    tie = lm.sanity_ordering({"method": 0.5, "shuffled": 0.5}, order)
    assert tie[0]["ok"] is False
    assert lm.sanity_ordering({"method": 0.5}, order) == []
