"""Intervals and significance (bench/stats.py) against direct computation, closed forms and simulation."""
from __future__ import annotations

import contextlib
import io
import itertools

import numpy as np
import pytest
import torch
from prdc import compute_prdc
from scipy import stats as sps

from bench import metrics as M
from bench import stats as S
from tests import tolerance as T


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


def ref_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    return M.features_to_statistics(torch.from_numpy(x))


# ---- resamplers equal the direct metric on the resampled rows -------------------------------------------

@pytest.mark.parametrize("n,d", [(40, 64), (120, 16)], ids=["n<=d (Gram route)", "n>d (d x d route)"])
def test_fid_resampler_equals_fid_of_the_resampled_rows(n, d):
    ref = ref_stats(gaussian(300, d, 0))
    x = gaussian(n, d, 1, shift=0.3)
    fid = S.FIDResampler(ref["mu"], ref["sigma"], x)

    def route_error(idx: np.ndarray) -> float:
        """Rounding bound of the resampler's route on rows idx (tests/tolerance.py): the n x n eigenproblem for
        n <= d; the d x d symmetric one otherwise, bounded by the nonsymmetric d x d bound (kappa >= 1)."""
        if n <= d:
            return T.fid_gram_error(x, ref["sigma"], idx)
        return T.fid_sqrtm_error(ref["sigma"], np.cov(x[idx], rowvar=False))

    # features_to_fid takes the same route as the resampler (centring before or after the Gram product): each is
    # within route_error of the exact FID. The Gram matrix has a null eigenvalue (the centring direction) whose
    # rounding noise enters through a square root: about 1e-7 here, not 1e-15 (measured 1.5e-9 relative).
    everything = np.arange(n)
    assert fid(everything) == pytest.approx(M.features_to_fid(ref, x), rel=0, abs=2 * route_error(everything))
    for idx in S.bootstrap_indices(n, 5, seed=3):
        # Duplicated rows included: the route must be exact for any multiset of rows. Against torch-fidelity's
        # sqrtm of the d x d product, whose d - rank(S_f) null eigenvalues each add up to sqrt(noise).
        tol = route_error(idx) + T.fid_sqrtm_error(ref["sigma"], np.cov(x[idx], rowvar=False))
        assert fid(idx) == pytest.approx(M.statistics_to_fid(ref, ref_stats(x[idx])), rel=0, abs=tol)


def test_kid_resampler_is_the_unbiased_mmd_and_matches_torch_fidelity_in_expectation():
    real, fake = gaussian(60, 8, 0), gaussian(30, 8, 1, shift=0.2)
    kid = S.KIDResampler(real, fake)
    k = S.polynomial_kernel
    m, n = len(real), len(fake)
    brute = ((k(fake, fake).sum() - np.trace(k(fake, fake))) / (n * (n - 1))
             + (k(real, real).sum() - np.trace(k(real, real))) / (m * (m - 1)) - 2 * k(fake, real).mean())
    # Both are the same sums in another order (precomputed kernel matrices against brute force): each is within
    # kid_error of the exact value, so they are within twice it.
    assert kid(np.arange(n)) == pytest.approx(brute, rel=0, abs=2 * T.kid_error(real, fake))
    # With equal set sizes and one subset holding everything, torch-fidelity's KID is this statistic exactly.
    same = S.KIDResampler(real[:n], fake)
    tf_one, _ = M.features_to_kid(torch.from_numpy(real[:n]), torch.from_numpy(fake), subsets=1, subset_size=n)
    assert same(np.arange(n)) == pytest.approx(tf_one, rel=0, abs=2 * T.kid_error(real[:n], fake))
    # torch-fidelity's subsets of size n hold every fake and n random reals: its mean over many subsets is the
    # same U-statistic in expectation. Its subsets are independent draws, so the mean's Monte Carlo standard error
    # is its std over subsets / sqrt(4000); 5 of them (two-sided p = 6e-7).
    tf_mean, tf_std = M.features_to_kid(torch.from_numpy(real), torch.from_numpy(fake), subsets=4000, subset_size=n)
    assert tf_mean == pytest.approx(brute, rel=0, abs=5 * tf_std / np.sqrt(4000))


def test_prdc_resampler_equals_the_prdc_package():
    real, fake = gaussian(50, 12, 0), gaussian(50, 12, 1, shift=0.4)
    prdc = S.PRDCResampler(real, fake, k=5)
    for idx in [np.arange(50), *S.bootstrap_indices(50, 3, seed=5)]:
        with contextlib.redirect_stdout(io.StringIO()):
            ref = compute_prdc(real_features=real, fake_features=fake[idx], nearest_k=5)
        # PRDC values are counts over n or k n (multiples of 1/250 here): both sides compare the same distances,
        # computed by two routes, so they agree exactly unless two distances tie to within rounding
        # (gamma_d |x|^2 ~ 1e-13 apart: probability ~1e-13 on Gaussian features). 1e-12 is far below one count.
        np.testing.assert_allclose(prdc(idx), [ref["precision"], ref["recall"], ref["density"], ref["coverage"]],
                                   rtol=0, atol=1e-12)


# ---- coverage and error rates on Gaussians with known answers ---------------------------------------------

def binomial_bounds(trials: int, p: float) -> tuple[int, int]:
    """Counts outside which a correct procedure lands with probability < 0.2% on either side."""
    return int(sps.binom.ppf(0.002, trials, p)), int(sps.binom.isf(0.002, trials, p))


def test_fid_interval_covers_the_expected_fid_at_this_n():
    """The interval is for the FID at this N (what a table column compares): over repeated sample sets, the 95%
    interval covers E[FID_N] (by simulation) about 95% of the time."""
    d, n, trials = 6, 150, 150
    ref = {"mu": np.zeros(d), "sigma": np.eye(d)}
    draw = lambda seed: gaussian(n, d, seed, shift=0.25, scale=1.2)  # noqa: E731
    expected = np.mean([M.features_to_fid(ref, draw(10_000 + i)) for i in range(3000)])
    covered = 0
    for t in range(trials):
        x = draw(t)
        fid = S.FIDResampler(ref["mu"], ref["sigma"], x)
        est = S.subsample_estimate(fid(np.arange(n)), fid, n, 200, seed=t)
        covered += est.ci[0] <= expected <= est.ci[1]
    lo, hi = binomial_bounds(trials, 0.95)
    assert lo - 4 <= covered <= hi, (covered, trials)  # a little slack below: the subsampling sd is itself noisy


def test_false_positive_rate_near_five_percent_and_a_worse_model_always_detected():
    """A/A on synthetic features: two sample sets of one distribution against one reference are "different"
    about 5% of the time; a clearly shifted distribution is "different" every time."""
    d, n, trials = 6, 120, 200
    ref = {"mu": np.zeros(d), "sigma": np.eye(d)}

    def fid_estimate(x: np.ndarray, seed: int) -> S.Estimate:
        fid = S.FIDResampler(ref["mu"], ref["sigma"], x)
        return S.subsample_estimate(fid(np.arange(len(x))), fid, len(x), 200, seed)

    same = worse = 0
    for t in range(trials):
        a = fid_estimate(gaussian(n, d, 2 * t, shift=0.2), t)
        b = fid_estimate(gaussian(n, d, 2 * t + 1, shift=0.2), t + 7)
        c = fid_estimate(gaussian(n, d, 2 * t + 1, shift=0.8), t + 7)
        same += S.independent_test(a.value, a.se, b.value, b.se) < 0.05
        worse += S.independent_test(c.value, c.se, a.value, a.se) < 0.05 and c.value > a.value
    lo, hi = binomial_bounds(trials, 0.05)
    assert lo <= same <= hi, same
    assert worse == trials


def test_kid_variance_is_hoeffdings_formula_by_brute_force_and_unbiased():
    rng = np.random.default_rng(0)
    kid = S.KIDResampler(rng.normal(size=(30, 5)), rng.normal(0.2, 1, size=(7, 5)))
    n = kid.n
    H = kid.k_ff - kid.k_fr_mean[:, None] - kid.k_fr_mean[None, :]
    perms = lambda k: list(itertools.permutations(range(n), k))  # noqa: E731
    # The moments over every ordered tuple of distinct fakes, by enumeration (7 fakes: 840 quadruples).
    e2 = np.mean([H[i, j] ** 2 for i, j in perms(2)])
    e3 = np.mean([H[i, j] * H[i, l] for i, j, l in perms(3)])
    e4 = np.mean([H[i, j] * H[a, b] for i, j, a, b in perms(4)])
    brute = (4 * (n - 2) * (e3 - e4) + 2 * (e2 - e4)) / (n * (n - 1))
    # Sums of at most 840 products of kernel values (~1-10) in two orders: gamma_840 relative to the sum of
    # |terms|, which is below 10^4 times the result here; 1e-9 relative is 100x that bound.
    assert kid.variance() == pytest.approx(brute, rel=1e-9)
    # Unbiased: over 3000 independent sets of 20 fakes the mean estimate equals the variance of KID over them,
    # within 5 Monte Carlo standard errors of the difference (sd of the variance of 3000 values: var sqrt(2/2999)).
    real = rng.normal(size=(200, 8))
    vals, var = [], []
    for _ in range(3000):
        k = S.KIDResampler(real, rng.normal(0.1, 1.1, size=(20, 8)))
        vals.append(k(np.arange(20)))
        var.append(k.variance())
    true = np.var(vals, ddof=1)
    mc = np.hypot(true * np.sqrt(2 / 2999), np.std(var) / np.sqrt(3000))
    assert abs(np.mean(var) - true) < 5 * mc, (np.mean(var), true, mc)


def test_kid_se_is_never_zero_and_its_false_positive_rate_is_bounded_at_the_smoke_shapes():
    """16 fakes against 64 reals of 2048-d features drawn alike: the unbiased zeta_1 estimate is negative for
    about a quarter of such sets, so the estimate clips each zeta at 0 (a zero se would make any gap certain)."""
    rng = np.random.default_rng(4)
    sd = np.sqrt(1.0 / np.arange(1, 2049))
    real = 0.4 + rng.standard_normal((64, 2048)) * sd
    trials, false = 200, 0
    for _ in range(trials):
        a, b = (S.KIDResampler(real, 0.4 + rng.standard_normal((16, 2048)) * sd).estimate() for _ in range(2))
        assert a.se > 0 and b.se > 0
        false += S.independent_test(a.value, a.se, b.value, b.se) < 0.05
    assert false <= binomial_bounds(trials, 0.05)[1], false


def test_is_resampler_is_torch_fidelitys_inception_score():
    logits = np.random.default_rng(0).normal(0, 3, size=(57, 30))
    isc = S.ISResampler(logits, splits=10, seed=2020)
    # Both: softmax in float64, 10 chunk means and logs of 30 terms, exp: a few hundred roundings of values ~1-30.
    assert isc(np.arange(57)) == pytest.approx(M.logits_to_isc(torch.from_numpy(logits), 10, 2020)[0], rel=1e-10)
    idx = np.sort(np.random.default_rng(1).choice(57, size=33, replace=False))
    assert isc(idx) == pytest.approx(M.logits_to_isc(torch.from_numpy(logits[idx]), 10, 2020)[0], rel=1e-10)
    assert isc(idx[:4]) == pytest.approx(M.logits_to_isc(torch.from_numpy(logits[idx[:4]]), 10, 2020)[0], rel=1e-10)


def test_subsampling_recovers_the_variance_of_a_mean_and_of_a_degenerate_u_statistic():
    """Var(T_m) = a/m + b/m^2: a mean (b = 0) and a degenerate U-statistic (a = 0) are both recovered; the
    delete-d jackknife alone overstates the second by (n/r + 1) (= 2.25 at r = 0.8 n)."""
    n, sizes = 200, S.subsample_sizes(200)
    assert sizes == (80, 160)
    # Exact conditional variances over subsets (the expectations the replicates estimate) for each model:
    lin = [1 / r - 1 / n for r in sizes]
    quad = [1 / r ** 2 - 1 / n ** 2 for r in sizes]
    # Each is a handful of float64 operations on numbers ~1e-2..1e-5: pytest.approx's 1e-6 relative is 1e10 ulps.
    assert S.subsample_variance(n, sizes, [3.0 * v for v in lin]) == pytest.approx(3.0 / n)
    assert S.subsample_variance(n, sizes, [5.0 * v for v in quad]) == pytest.approx(5.0 / n ** 2)
    assert S.subsample_variance(n, sizes, [3 * a + 5 * b for a, b in zip(lin, quad)]) == pytest.approx(
        3.0 / n + 5.0 / n ** 2)
    # A variance that falls faster than m^-2 (rate 4): the fixed-form fit stays non-negative, rate_variance is exact.
    fast = [r ** -4.0 - n ** -4.0 for r in sizes]
    assert S.subsample_variance(n, sizes, fast) >= 0
    assert S.rate_variance(n, sizes, tuple(fast)) == pytest.approx(n ** -4.0)
    assert S.rate_variance(n, sizes, (lin[0], lin[1])) == pytest.approx(1 / n)
    # On data: the mean of 200 Gaussians, whose subset means vary by exactly s^2 (1/r - 1/n) (s: ddof=1), so the
    # fit's target is s / sqrt(n). Monte Carlo error: each size's variance from 1000 subsets has relative sd
    # sqrt(2/999); the fit is se^2 = -2/3 var_80 + 8 var_160 with var_80 = 1.5 and var_160 = 0.25 in units of
    # s^2/n, so se^2 has relative sd sqrt((1 + 4) * 2/999) = 0.10 and se 0.05: 20% is 4 sd.
    x = np.random.default_rng(3).normal(size=n)
    se = S.subsample_se(lambda idx: x[idx].mean(), n, 2000, seed=2)
    assert se[0] == pytest.approx(x.std(ddof=1) / np.sqrt(n), rel=0.2)


def test_delete_d_jackknife_of_a_mean_is_its_standard_error_and_shares_get_the_binomial_floor():
    x = gaussian(400, 1, 0)[:, 0]
    idx = S.delete_d_indices(400, 2000, seed=1, keep=0.75)
    assert idx.shape == (2000, 300) and all(len(np.unique(i)) == 300 for i in idx[:20])
    est = S.delete_d_estimate(x.mean(), np.array([x[i].mean() for i in idx]), 400, 300)
    # For a mean, r/(n-r) * var(subset means) = s^2/n * n/(n-1) (finite-population correction undone). The se
    # from 2000 resamples carries Monte Carlo error of relative sd 1/sqrt(2 * 2000) = 1.6%: 5% is 3.2 sd.
    assert est.se == pytest.approx(x.std(ddof=1) / np.sqrt(400), rel=0.05)
    # A share of 50 rows that no subset moves: the binomial floor, with p clipped to 1/50.
    zero = S.delete_d_estimate(0.0, np.zeros(100), 80, 60, "coverage", share_of=50)
    # A closed form of four float64 operations on both sides: pytest.approx's relative 1e-6 is 1e9 ulps.
    assert zero.se == pytest.approx(np.sqrt(1 / 50 * 49 / 50 / 50)) and zero.ci[0] == 0.0
    assert S.delete_d_estimate(0.3, np.zeros(100), 80, 60, "coverage").se == 0.0  # no floor for non-shares


@pytest.mark.parametrize("shift", [0.0, 0.6, 1.2], ids=["on the data", "half-way", "near the floor"])
def test_prdc_false_positive_rate_near_five_percent(shift):
    """A/A for PRDC on Gaussian features: two sample sets of one distribution against one fixed reference are
    "different" about 5% of the time per metric, from near-perfect (coverage ~0.97) to near the floor (~0.1).
    The plain bootstrap fails this for coverage (measured: 31% false positives at shift 1.2), and recall."""
    d, n, trials = 16, 100, 150
    real = gaussian(n, d, 0)

    def estimates(fake: np.ndarray, seed: int) -> dict[str, S.Estimate]:
        values = dict(zip(S.PRDCResampler.NAMES, S.PRDCResampler(real, fake, 5)(np.arange(n))))
        return S.prdc_estimates(real, fake, 5, values, 100, seed)

    rejected = dict.fromkeys(S.PRDCResampler.NAMES, 0)
    for t in range(trials):
        a = estimates(gaussian(n, d, 1000 + 2 * t, shift=shift), t)
        b = estimates(gaussian(n, d, 1001 + 2 * t, shift=shift), t + 7)
        for name in rejected:
            p = S.independent_test(a[name].value, a[name].se, b[name].value, b[name].se)
            rejected[name] += p is not None and p < 0.05
    lo, hi = binomial_bounds(trials, 0.05)
    assert all(count <= hi for count in rejected.values()), (rejected, hi)
    assert sum(rejected.values()) >= 4 * lo, rejected  # not a test that never rejects


def test_prdc_estimates_with_few_samples_keep_more_than_k_fakes_per_subset():
    real = gaussian(8, 4, 0)
    for n in (7, 8, 9):
        fake = gaussian(n, 4, n)
        values = dict(zip(S.PRDCResampler.NAMES, S.PRDCResampler(real, fake, 5)(np.arange(n))))
        est = S.prdc_estimates(real, fake, 5, values, 20, 0)
        assert all(e.se is not None for e in est.values()), n
    est = S.prdc_estimates(real, gaussian(6, 4, 1), 5, dict.fromkeys(S.PRDCResampler.NAMES, 0.5), 20, 0)
    assert all(e.se is None and e.value == 0.5 for e in est.values())


def test_prdc_detects_a_clearly_worse_model():
    d, n = 16, 100
    real = gaussian(n, d, 0)
    for t in range(20):
        est = {}
        for name, shift in (("good", 0.3), ("bad", 1.5)):
            fake = gaussian(n, d, 50 + 2 * t + (name == "bad"), shift=shift)
            values = dict(zip(S.PRDCResampler.NAMES, S.PRDCResampler(real, fake, 5)(np.arange(n))))
            est[name] = S.prdc_estimates(real, fake, 5, values, 100, t)
        for metric in S.PRDCResampler.NAMES:
            good, bad = est["good"][metric], est["bad"][metric]
            assert bad.value < good.value and S.independent_test(bad.value, bad.se, good.value, good.se) < 0.05, metric


def test_paired_test_is_the_one_sample_t_test_on_differences():
    rng = np.random.default_rng(0)
    a = rng.normal(5, 1, 400)
    b = a + rng.normal(0.02, 0.2, 400)
    mean, se, p = S.paired_test(a, b)
    d = a - b
    # Sums of 400 float64 values in two orders: within 2 gamma_400 = 1e-13 relative (values of one sign: a - b
    # ~ 0.02 +- 0.2 has both, but |d| sums to < 20 |mean d|, so 2e-12); pytest.approx's 1e-6 holds on any kernel.
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 20)
    # The same normal tail of the same float64 argument: scipy's sf in both, a few ulps apart at most.
    assert p == pytest.approx(2 * sps.norm.sf(abs(mean) / se), rel=1e-12)
    assert 0.01 < p < 0.5  # a moderate p, where the normal and t (399 dof) tails agree closely
    # Not rounding: the t(399) tail exceeds the normal one by about (1 + z^2) / (4 * 399) relative (z < 2.6 for
    # p > 0.01: < 0.5%); 2% bounds it.
    assert p == pytest.approx(sps.ttest_1samp(d, 0).pvalue, rel=0.02)
    assert S.paired_test(a, a.copy()) == (0.0, 0.0, 1.0)


def test_seed_interval_is_the_t_interval():
    v = [224.3, 224.9, 222.5]
    e = S.seed_estimate(v)
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(v), scale=sps.sem(v))
    # Three values, the same t quantile: a few roundings apart; pytest.approx's relative 1e-6 is 1e9 ulps.
    assert e.value == pytest.approx(np.mean(v)) and e.ci == pytest.approx((lo, hi))
    assert S.seed_estimate([1.0]).ci is None


def test_welch_test_matches_scipy_and_handles_identical_values():
    a, b = [228.3, 224.4, 226.7], [254.3, 253.9, 255.1]
    # Welch's statistic and dof from three values each, then the t tail: tens of roundings, each amplified by
    # the tail's condition |t f(t) / sf(t)| < 100 here; pytest.approx's relative 1e-6 leaves 1e6 ulps of it.
    assert S.welch_test(a, b) == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert S.welch_test([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert S.welch_test([1.0], [2.0, 3.0]) is None


def test_holm_against_brute_force():
    p = [0.001, 0.04, 0.03, None, 0.2, 0.012]
    # Sorted testable: 0.001 (<= .05/5), 0.012 (<= .05/4 = .0125), 0.03 (> .05/3): stop.
    assert S.holm(p) == [True, False, False, None, False, True]
    assert S.holm([0.04]) == [True]
    assert S.holm([None]) == [None]


def test_mean_estimate_and_normal_interval():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    e = S.mean_estimate(v)
    # 2.5 is exact (small integers); the se and interval are a few roundings from the closed form (approx: 1e-6).
    assert e.value == 2.5 and e.se == pytest.approx(np.std(v, ddof=1) / 2)
    assert e.ci == pytest.approx((2.5 - S.Z95 * e.se, 2.5 + S.Z95 * e.se))


def test_train_match_is_the_nearest_training_grid_by_brute_force():
    from bench.evaluate import train_match

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 4, (37, 6), generator=g)
    samples = torch.cat([torch.randint(0, 4, (20, 6), generator=g), train[[3, 11]]])
    expected = [max(sum(int(a == b) for a, b in zip(s.tolist(), t.tolist())) for t in train) / 6 for s in samples]
    for cells in (6, 100, 2 ** 26):  # one comparison row at a time, a few, everything at once
        assert train_match(samples, train, max_cells=cells).tolist() == expected
    assert expected[-2:] == [1.0, 1.0] and min(expected) < 1.0
    with pytest.raises(ValueError, match="different lengths"):
        train_match(samples[:, :5], train)


def draw_grids(train: torch.Tensor, n: int, noise: float, seed: int) -> torch.Tensor:
    """A 'prior' that recalls random training grids with a share `noise` of positions redrawn uniformly."""
    g = torch.Generator().manual_seed(seed)
    x = train[torch.randint(0, len(train), (n,), generator=g)].clone()
    redraw = torch.rand(x.shape, generator=g) < noise
    return torch.where(redraw, torch.randint(0, 16, x.shape, generator=g), x)


def test_train_match_aa_not_different_and_a_copier_comes_out_closer():
    """A/A: two sample sets of one sampler are "different" on train_match about 5% of the time; a sampler that
    copies more (10% of positions redrawn against 40%) is closer every time, and its exact copies are counted."""
    from bench.evaluate import train_match_metrics

    train = torch.randint(0, 16, (300, 16), generator=torch.Generator().manual_seed(1))
    trials, n = 200, 120
    same = closer = 0
    for t in range(trials):
        a = train_match_metrics(draw_grids(train, n, 0.4, 3 * t), train)
        b = train_match_metrics(draw_grids(train, n, 0.4, 3 * t + 1), train)
        c = train_match_metrics(draw_grids(train, n, 0.1, 3 * t + 2), train)
        same += S.independent_test(a["train_match"], a["train_match_se"], b["train_match"], b["train_match_se"]) < 0.05
        closer += (S.independent_test(c["train_match"], c["train_match_se"], a["train_match"], a["train_match_se"])
                   < 0.05 and c["train_match"] > a["train_match"])
    lo, hi = binomial_bounds(trials, 0.05)
    assert lo <= same <= hi, same
    assert closer == trials
    # Copies: 16 positions each kept with probability 0.9 (plus redraws that land on the same code): about
    # 0.9^16 = 19% of the close sampler's grids are exact copies, none of a sampler that never recalls.
    assert 0.1 < c["train_copies"] < 0.35 and c["train_copies_ci"][0] > 0
    fresh = train_match_metrics(torch.randint(0, 16, (n, 16), generator=torch.Generator().manual_seed(9)), train)
    assert fresh["train_copies"] == 0 and fresh["train_copies_se"] > 0 and fresh["n_match_samples"] == n
