"""Uncertainty and significance for the evaluation protocol (docs/design.md, "Evaluation"). numpy/scipy only.

Every sample metric's standard error is for the metric *at this N* (the quantity a table column compares) over
independent sample sets, the real reference held fixed: every number in a column is measured against the same
reference at the same N, so the reference is a shared constant of the comparison, not a source of its noise. The
interval is value +- z * se. Replicates recompute the metric exactly on row subsets through precomputed Gram /
distance / softmax matrices (`FIDResampler`, `KIDResampler`, `PRDCResampler`, `ISResampler`, each tested equal to
the direct computation on the same rows). The estimator of each metric is the one whose se matched the metric's
true spread on simulated features (tests/test_calibration.py; docs/protocol.md has the ratios):

- FID and completion FID: subsets drawn *without* replacement at two sizes (0.4 n and 0.8 n). Over subsets of r
  of the n rows, E[var(T_r)] = Var(T_r) - Var(T_n); with Var(T_m) = a/m + b/m^2 (FID's linear part and its
  degenerate quadratic part, which dominates when the fakes match the reference) the two sizes give a and b
  (non-negative least squares) and Var(T_n) = a/n + b/n^2. Resampling *with* replacement duplicates rows, which
  shrinks the sample covariance's rank and inflated the se several-fold; the delete-d jackknife (one size, rate
  1/m) counts the quadratic part (n/r + 1) times.
- KID: no resampling. KID is a U-statistic of the fakes (kernel k(x, y) - g(x) - g(y), g the mean kernel against
  the fixed reference), whose variance has Hoeffding's closed form with an unbiased estimate from the fakes' kernel
  matrix (`KIDResampler.variance`). A bootstrap duplicate adds k(x, x) to the fake-fake term.
- PRDC: subsets of distinct fakes. Precision and density are means over the fakes (given the fixed reals): the
  delete-d jackknife on subsets of r = 0.6 n, variance (r / d) var(replicates) (Shao & Wu 1989), is exact for
  them; recall (whose fake radii grow as fakes are deleted) matched its true spread at that size. Coverage near 1
  falls faster with the number of fakes than a fixed power (a real stays uncovered with probability (1 - q)^m):
  `rate_variance` estimates its rate from subsets of 0.4 n and 0.8 n (Bertail, Politis & Romano 1999).
  Recall and coverage, shares of m real rows, keep the binomial sqrt(p (1 - p) / m) as a floor on their se
  (p clipped to [1/m, 1 - 1/m]): near 0 or 1 a share barely moves under any resampling, but another sample set
  still can flip a real row.
- IS: the bootstrap. IS is a mean of ten splits' scores, each a smooth function of its rows' mean p(y|x) that a
  duplicated row barely moves; subsets are the wrong tool for it, since a subset's splits are smaller and IS
  changes with the split size itself.
- train_match and NLL: means of per-item values, sd / sqrt(n).

Significance between two points evaluated against the same reference is a z-test with
se_diff = sqrt(se_a^2 + se_b^2) (independent sample sets: exactly what resampling both gives). NLLs are
compared on the same validation sequences by the paired per-sequence difference. Across training seeds: mean
and a t-interval; two points with >= 2 seeds each are compared by Welch's t-test on the seed values.
Many comparisons in one table are controlled with Holm's step-down procedure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
Z95 = float(sps.norm.ppf(0.5 + LEVEL / 2))  # 1.959964


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float | None  # standard error (bootstrap or jackknife, or sd/sqrt(n) over sequences); None if unknown
    ci: tuple[float, float] | None  # 95% interval

    def as_results(self, key: str) -> dict[str, object]:
        return {key: self.value, f"{key}_se": self.se, f"{key}_ci": list(self.ci) if self.ci else None}


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices drawn with replacement by a seeded generator."""
    if resamples < 2:
        raise ValueError(f"bootstrap needs at least 2 resamples, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


# The range each bounded metric lives in: its interval is clipped to it (a coverage cannot exceed 1).
BOUNDS = {"fid": (0.0, math.inf), "completion_fid": (0.0, math.inf), "prdc_precision": (0.0, 1.0),
          "recall": (0.0, 1.0), "coverage": (0.0, 1.0), "density": (0.0, math.inf), "is_mean": (1.0, math.inf),
          "train_match": (0.0, 1.0), "train_copies": (0.0, 1.0)}


def normal_interval(value: float, se: float | None, z: float = Z95,
                    bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float] | None:
    if se is None or not math.isfinite(se):
        return None
    return max(bounds[0], value - z * se), min(bounds[1], value + z * se)


def replicate_sd(replicates: np.ndarray) -> float | None:
    """Standard deviation of the finite replicates (None below two)."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    return float(reps.std(ddof=1)) if len(reps) > 1 else None


def bounded_estimate(value: float, se: float | None, key: str | None = None) -> Estimate:
    """Point value with the normal 95% interval around it, clipped to the metric's range (BOUNDS[key])."""
    return Estimate(float(value), se, normal_interval(float(value), se, bounds=BOUNDS.get(key, (-math.inf, math.inf))))


def bootstrap_estimate(value: float, replicates: np.ndarray, key: str | None = None) -> Estimate:
    """Point value with the bootstrap sd as its standard error."""
    return bounded_estimate(value, replicate_sd(replicates), key)


def delete_d_indices(n: int, resamples: int, seed: int, keep: float) -> np.ndarray:
    """(resamples, r) sorted row indices of random subsets of r = round(keep * n) distinct rows (1 <= r < n)."""
    if resamples < 2:
        raise ValueError(f"the jackknife needs at least 2 resamples, got {resamples}")
    r = min(n - 1, max(1, round(keep * n)))
    g = np.random.default_rng(seed)
    return np.stack([np.sort(g.choice(n, size=r, replace=False)) for _ in range(resamples)])


def delete_d_estimate(value: float, replicates: np.ndarray, n: int, r: int, key: str | None = None,
                      share_of: int | None = None) -> Estimate:
    """Delete-d jackknife: se = sqrt(r / (n - r) * var(replicates on r-row subsets)). `share_of` = m: the metric
    is a share of m fixed rows, and se is at least the binomial sqrt(p (1 - p) / m), p clipped to [1/m, 1-1/m]."""
    sd = replicate_sd(replicates)
    if sd is None or not 1 <= r < n:
        return Estimate(float(value), None, None)
    se = sd * math.sqrt(r / (n - r))
    if share_of:
        se = max(se, binomial_se(float(value), share_of))
    return bounded_estimate(value, se, key)


# ---- subsampling without replacement at two sizes (FID, completion FID, IS) ----------------------------------

# Subset sizes as shares of n. Over subsets of r distinct rows, E[var(T_r)] = Var(T_r) - Var(T_n) (the metric of
# all n rows is the mean of its subsets' metrics to first order); with Var(T_m) = a/m + b/m^2 (a linear part and
# a degenerate quadratic part, the leading terms of a smooth statistic of m rows), two sizes identify a and b.
SUBSET_SHARES = (0.4, 0.8)


def subsample_sizes(n: int) -> tuple[int, ...]:
    """The distinct subset sizes used for n rows (each 2 <= r < n)."""
    return tuple(sorted({min(n - 1, max(2, round(s * n))) for s in SUBSET_SHARES}))


def subsample_variance(n: int, sizes: Sequence[int], variances: Sequence[float]) -> float | None:
    """Var(T_n) from the spread of T over subsets of each size r (without replacement): non-negative least squares
    of var_r = a (1/r - 1/n) + b (1/r^2 - 1/n^2), then a/n + b/n^2. One size alone: the linear part only."""
    from scipy.optimize import nnls

    rows = [(r, v) for r, v in zip(sizes, variances) if v is not None and math.isfinite(v) and 1 <= r < n]
    if not rows:
        return None
    A = np.array([[(1 / r - 1 / n) * n, (1 / r ** 2 - 1 / n ** 2) * n * n] for r, _ in rows])  # (k, 2)
    v = np.array([v for _, v in rows])
    if len(rows) == 1:
        return float(v[0] / A[0, 0])
    (a, b), _ = nnls(A, v)
    return float(a + b)  # in units of 1/n and 1/n^2: a/n + b/n^2 of the unscaled fit


def rate_variance(n: int, sizes: tuple[int, int], variances: tuple[float, float]) -> float | None:
    """Var(T_n) when Var(T_m) = C m^-g with an unknown rate g (Bertail, Politis & Romano 1999): over subsets of
    r < n distinct rows var_r = C (r^-g - n^-g), so var_r1 / var_r2 = ((n/r1)^g - 1) / ((n/r2)^g - 1) fixes g
    (clipped to [RATE_RANGE]), and Var(T_n) = var_r2 / ((n/r2)^g - 1). For statistics whose variance falls faster
    than any fixed power over the sizes used (coverage near 1: an uncovered real stays so with probability
    (1 - q)^m), where a fixed rate overstates it."""
    from scipy.optimize import brentq

    (r1, r2), (v1, v2) = sizes, variances
    if v1 is None or v2 is None or not 1 <= r1 < r2 < n:
        return None
    if v2 <= 0:
        return 0.0
    gap = lambda g: ((n / r1) ** g - 1) / ((n / r2) ** g - 1) - v1 / v2  # noqa: E731 (increasing in g)
    lo, hi = RATE_RANGE
    g = lo if gap(lo) >= 0 else hi if gap(hi) <= 0 else brentq(gap, lo, hi)
    return float(v2 / ((n / r2) ** g - 1))


# The rates rate_variance may fit: 1/2 (slower than a mean) to 8 (a share near its bound at the sizes used).
RATE_RANGE = (0.5, 8.0)


def subsample_indices(n: int, resamples: int, seed: int) -> list[np.ndarray]:
    """Per subset size (subsample_sizes), a (resamples // sizes, r) array of sorted distinct row indices."""
    if resamples < 2:
        raise ValueError(f"subsampling needs at least 2 resamples, got {resamples}")
    sizes = subsample_sizes(n)
    per = max(2, resamples // len(sizes))
    g = np.random.default_rng(seed)
    return [np.stack([np.sort(g.choice(n, size=r, replace=False)) for _ in range(per)]) for r in sizes]


def subsample_se(stat: Callable[[np.ndarray], float | np.ndarray], n: int, resamples: int, seed: int
                 ) -> np.ndarray | None:
    """Standard error(s) of stat(all n rows) by subsampling without replacement at two sizes (None below 4 rows)."""
    if n < 4:
        return None
    plan = subsample_indices(n, resamples, seed)
    reps = [np.stack([np.atleast_1d(np.asarray(stat(i), np.float64)) for i in idx]) for idx in plan]  # (b, k) each
    sizes = [idx.shape[1] for idx in plan]
    out = []
    for j in range(reps[0].shape[1]):
        var = [replicate_sd(r[:, j]) for r in reps]
        total = subsample_variance(n, sizes, [None if s is None else s * s for s in var])
        out.append(math.nan if total is None else math.sqrt(max(total, 0.0)))
    return np.array(out)


def subsample_estimate(value: float, stat: Callable[[np.ndarray], float], n: int, resamples: int, seed: int,
                       key: str | None = None) -> Estimate:
    """Point value with the two-size subsampling standard error (subsample_se)."""
    se = subsample_se(stat, n, resamples, seed)
    return bounded_estimate(value, None if se is None or not math.isfinite(se[0]) else float(se[0]), key)


def binomial_se(p: float, m: int) -> float:
    """sqrt(p (1 - p) / m) with p clipped to [1/m, 1 - 1/m]: the floor of a share's standard error, so that a share
    of 0 (or 1) in both rows does not make one differing item a certain difference."""
    p = min(max(p, 1.0 / m), 1.0 - 1.0 / m)
    return math.sqrt(p * (1 - p) / m)


def mean_estimate(values: np.ndarray) -> Estimate:
    """Mean of per-item values (e.g. per-sequence NLL) with its standard error sd / sqrt(n)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return Estimate(m, se, normal_interval(m, se))


# ---- resamplers: exact metric of resampled rows from precomputed matrices ---------------------------------

class FIDResampler:
    """FID of row subsets/resamples of fake features X (n, d) against fixed reference statistics (mu_r, S_r).

    n <= d: from the n x n matrices G = X S_r X^T and K = X X^T (the low-rank route of
    bench.metrics.features_to_fid): for rows idx with mean m = X[idx]^T 1/n,
      Tr(S_f) = (tr K[idx, idx] - n m^T m) / (n - 1),   m^T m = 1^T K[idx, idx] 1 / n^2,
      Tr((S_r S_f)^(1/2)) = sum sqrt(eig(Yc S_r Yc^T / (n - 1))), Yc S_r Yc^T from G[idx, idx] and row sums.
    n > d: the d x d route, Tr((S_r^(1/2) S_f S_r^(1/2))^(1/2)) with S_r^(1/2) computed once.
    """

    def __init__(self, mu_r: np.ndarray, sigma_r: np.ndarray, x: np.ndarray):
        x = np.asarray(x, np.float64)
        self.n, self.d = x.shape
        self.mu_r = np.asarray(mu_r, np.float64)
        self.sigma_r = np.asarray(sigma_r, np.float64)
        self.tr_r = float(np.trace(self.sigma_r))
        self.x = x
        if self.n <= self.d:
            xs = x @ self.sigma_r  # (n, d)
            self.G = xs @ x.T  # (n, n)
            self.K = x @ x.T  # (n, n)
            self.xmu = x @ self.mu_r  # (n,)
        else:
            w, v = np.linalg.eigh(self.sigma_r)
            self.sqrt_r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_r^(1/2), symmetric

    def __call__(self, idx: np.ndarray) -> float:
        n = len(idx)
        if n < 2:
            raise ValueError("FID needs at least 2 rows")
        if self.n > self.d:
            y = self.x[idx]
            m = y.mean(0)
            yc = y - m
            s_f = yc.T @ yc / (n - 1)
            inner = self.sqrt_r @ s_f @ self.sqrt_r
            tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum()
            diff = self.mu_r - m
            return float(diff @ diff + self.tr_r + np.trace(s_f) - 2 * tr_covmean)
        G = self.G[np.ix_(idx, idx)]
        K = self.K[np.ix_(idx, idx)]
        g_row = G.mean(1)  # Y S m  (n,)
        g_all = g_row.mean()  # m^T S m
        centred = G - g_row[:, None] - g_row[None, :] + g_all  # Yc S Yc^T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(centred / (n - 1)), 0, None)).sum()
        mm = K.mean()  # m^T m
        tr_f = (np.trace(K) - n * mm) / (n - 1)
        diff2 = self.mu_r @ self.mu_r - 2 * self.xmu[idx].mean() + mm
        return float(diff2 + self.tr_r + tr_f - 2 * tr_covmean)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018; torch-fidelity's default)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


class KIDResampler:
    """Unbiased MMD^2 between resampled fake rows and all reference rows (polynomial kernel), from fixed kernel
    matrices. Its expectation is that of torch-fidelity's subset KID whose subsets hold every fake."""

    def __init__(self, real: np.ndarray, fake: np.ndarray):
        real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
        k_rr = polynomial_kernel(real, real)
        m = len(real)
        self.rr = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
        self.n = len(fake)
        self.k_ff = polynomial_kernel(fake, fake)
        self.k_fr_mean = polynomial_kernel(fake, real).mean(1)  # (n,) mean over the reference

    def __call__(self, idx: np.ndarray) -> float:
        n = len(idx)
        k = self.k_ff[np.ix_(idx, idx)]
        ff = (k.sum() - np.trace(k)) / (n * (n - 1))
        return float(ff + self.rr - 2 * self.k_fr_mean[idx].mean())

    def variance(self) -> float:
        """Unbiased estimate of the variance of KID over sample sets of n fakes, the reference fixed.

        KID - const is the U-statistic of the fakes with kernel h(x, y) = k(x, y) - g(x) - g(y), g = mean k(., real),
        whose variance is Hoeffding's (4 (n - 2) zeta_1 + 2 zeta_2) / (n (n - 1)), zeta_1 = Cov(h(X, Y), h(X, Z)),
        zeta_2 = Var h(X, Y). Each moment has an unbiased estimate over distinct index tuples of the n x n matrix H:
        E h^2 over pairs, E h(X, Y) h(X, Z) over triples, (E h)^2 over quadruples (T^2 less the overlapping terms).
        """
        n = self.n
        if n < 4:
            return math.nan
        zeta1, zeta2 = self.zetas()
        return float((4 * (n - 2) * zeta1 + 2 * zeta2) / (n * (n - 1)))

    def zetas(self) -> tuple[float, float]:
        """Unbiased estimates of (zeta_1, zeta_2) from the n x n matrix H (n >= 4), as `variance` describes."""
        n = self.n
        H = self.k_ff - self.k_fr_mean[:, None] - self.k_fr_mean[None, :]
        np.fill_diagonal(H, 0.0)
        sq = H * H
        s2 = sq.sum()  # sum over ordered pairs i != j of h_ij^2
        row = H.sum(1)
        s3 = float((row * row).sum() - s2)  # sum over i and distinct j, k (both != i) of h_ij h_ik
        total = row.sum()
        s4 = total * total - 2 * s2 - 4 * s3  # sum over ordered pairs of pairs with four distinct indices
        theta2 = s4 / (n * (n - 1) * (n - 2) * (n - 3))
        zeta2 = s2 / (n * (n - 1)) - theta2
        zeta1 = s3 / (n * (n - 1) * (n - 2)) - theta2
        return float(zeta1), float(zeta2)

    def variance_clipped(self) -> float:
        """`variance` with each zeta clipped at 0 (both are variances). When the fakes match the reference zeta_1
        is ~0 and its unbiased estimate, weighted 2 (n - 2) times zeta_2's, is negative for about a quarter of
        sample sets: the unclipped sum then reads as a zero standard error and any difference as certain."""
        n = self.n
        if n < 4:
            return math.nan
        zeta1, zeta2 = self.zetas()
        return float((4 * (n - 2) * max(zeta1, 0.0) + 2 * max(zeta2, 0.0)) / (n * (n - 1)))

    def estimate(self, key: str | None = None) -> Estimate:
        """KID of all fakes with the standard error of `variance_clipped`."""
        var = self.variance_clipped()
        se = math.sqrt(max(var, 0.0)) if math.isfinite(var) else None
        return bounded_estimate(self(np.arange(self.n)), se, key)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (n_a, n_b) in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def kth_neighbour_radii(d: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest neighbour, the row itself (distance 0) counted first, as prdc."""
    return np.partition(d, k, axis=1)[:, k]


class PRDCResampler:
    """Precision, recall, density, coverage (Naeem et al. 2020, as the `prdc` package computes them) of
    resampled fake rows against fixed real rows, from precomputed distance matrices."""

    NAMES = ("prdc_precision", "recall", "density", "coverage")
    SHARES_OF_REAL = ("recall", "coverage")  # means over the real rows (the rest: over the fake rows)
    KEEP = 0.6  # delete-d jackknife subsets for precision, recall, density (prdc_estimates)
    COVERAGE_SHARES = (0.4, 0.8)  # subset sizes for coverage's rate_variance

    def __init__(self, real: np.ndarray, fake: np.ndarray, k: int):
        self.k = int(k)
        self.real_radii = kth_neighbour_radii(pairwise_distances(real, real), self.k)  # (m,)
        self.d_rf = pairwise_distances(real, fake)  # (m, n)
        self.d_ff = pairwise_distances(fake, fake)  # (n, n)

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        d_rf = self.d_rf[:, idx]  # (m, n)
        fake_radii = kth_neighbour_radii(self.d_ff[np.ix_(idx, idx)], self.k)  # (n,)
        inside_real = d_rf < self.real_radii[:, None]  # (m, n)
        precision = inside_real.any(0).mean()
        recall = (d_rf < fake_radii[None, :]).any(1).mean()
        density = inside_real.sum(0).mean() / self.k
        coverage = (d_rf.min(1) < self.real_radii).mean()
        return np.array([precision, recall, density, coverage], dtype=np.float64)

    def coverage(self, idx: np.ndarray) -> float:
        """Coverage alone (the fake-fake distances are not needed for it)."""
        return float((self.d_rf[:, idx].min(1) < self.real_radii).mean())


class ISResampler:
    """Inception Score of row subsets of logits (n, C), as torch-fidelity's isc_features_to_metric computes it
    (rows permuted by np.random.RandomState(seed), `splits` consecutive chunks, mean of the chunks' scores), from
    the precomputed softmax: a chunk's score is exp(mean_i sum_y p_iy log p_iy - sum_y q_y log q_y), q its mean p."""

    def __init__(self, logits: np.ndarray, splits: int, seed: int):
        z = np.asarray(logits, np.float64)
        z = z - z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        self.p = np.exp(log_p)  # (n, C)
        self.neg_entropy = (self.p * log_p).sum(1)  # (n,)
        self.n = len(z)
        self.splits = int(splits)
        self.seed = int(seed)

    def __call__(self, idx: np.ndarray) -> float:
        rows = np.asarray(idx)[np.random.RandomState(self.seed).permutation(len(idx))]
        n, scores = len(rows), []
        splits = min(self.splits, n)  # as bench.metrics.logits_to_isc clips them
        for i in range(splits):
            chunk = rows[i * n // splits:(i + 1) * n // splits]
            q = self.p[chunk].mean(0)
            q_log_q = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum()
            scores.append(math.exp(self.neg_entropy[chunk].mean() - q_log_q))
        return float(np.mean(scores))


def bootstrap(stat: Callable[[np.ndarray], float | np.ndarray], n: int, resamples: int, seed: int) -> np.ndarray:
    """stat(idx) over `resamples` bootstrap index sets: (resamples,) or (resamples, k)."""
    return np.stack([np.asarray(stat(idx)) for idx in bootstrap_indices(n, resamples, seed)])


def prdc_estimates(real: np.ndarray, fake: np.ndarray, k: int, values: dict[str, float], resamples: int,
                   seed: int) -> dict[str, Estimate]:
    """The four PRDC metrics of `values` (computed on all rows) with their standard errors from `resamples`
    subsets of distinct fakes per size: precision, recall and density by the delete-d jackknife on subsets of
    PRDCResampler.KEEP n, coverage by rate_variance on subsets of PRDCResampler.COVERAGE_SHARES n."""
    n = len(fake)
    if n <= k + 1:  # a subset needs more than k fakes for their k-th neighbour radii
        return {name: Estimate(float(values[name]), None, None) for name in PRDCResampler.NAMES}
    prdc = PRDCResampler(real, fake, k)
    jack = delete_d_indices(n, resamples, seed, max(PRDCResampler.KEEP, (k + 1) / n))
    reps = np.stack([prdc(i) for i in jack])  # (resamples, 4)
    out = {}
    for j, name in enumerate(PRDCResampler.NAMES[:3]):
        share_of = len(real) if name in PRDCResampler.SHARES_OF_REAL else None
        out[name] = delete_d_estimate(values[name], reps[:, j], n, jack.shape[1], name, share_of=share_of)
    plan = [delete_d_indices(n, resamples, seed + 1 + i, keep) for i, keep in enumerate(PRDCResampler.COVERAGE_SHARES)]
    sizes = tuple(idx.shape[1] for idx in plan)
    sds = [replicate_sd(np.array([prdc.coverage(i) for i in idx])) for idx in plan]
    var = None if None in sds or len(set(sizes)) < 2 else rate_variance(n, sizes, (sds[0] ** 2, sds[1] ** 2))
    value = float(values["coverage"])
    out["coverage"] = (Estimate(value, None, None) if var is None else
                       bounded_estimate(value, max(math.sqrt(var), binomial_se(value, len(real))), "coverage"))
    return out


# ---- across seeds ------------------------------------------------------------------------------------------

def seed_estimate(values: Sequence[float]) -> Estimate:
    """Mean over training seeds with the 95% t-interval (None below two seeds)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return Estimate(float("nan"), None, None)
    m = float(v.mean())
    if len(v) < 2:
        return Estimate(m, None, None)
    se = float(v.std(ddof=1) / math.sqrt(len(v)))
    half = float(sps.t.ppf(0.5 + LEVEL / 2, len(v) - 1)) * se
    return Estimate(m, se, (m - half, m + half))


# ---- tests ---------------------------------------------------------------------------------------------------

def z_test(diff: float, se: float | None) -> float | None:
    """Two-sided p-value of diff = 0 given its standard error (None when either is unknown). A zero se (a
    metric pinned at its bound in every resample, e.g. coverage 0) makes any nonzero difference certain."""
    if se is None or not math.isfinite(se) or not math.isfinite(diff):
        return None
    if se == 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * sps.norm.sf(abs(diff) / se))


def independent_test(a: float, se_a: float | None, b: float, se_b: float | None) -> float | None:
    """p-value of a == b for two estimates from independent samples (same fixed reference)."""
    if se_a is None or se_b is None:
        return None
    return z_test(a - b, math.sqrt(se_a ** 2 + se_b ** 2))


def paired_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float | None]:
    """(mean difference a - b, its standard error, two-sided p) for per-item values on the same items."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return mean, se, z_test(mean, se)


def welch_test(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Welch's t-test p-value on per-seed values (None below two values per side)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return None
    if a.std() == 0 and b.std() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: Sequence[float | None], alpha: float = 1 - LEVEL) -> list[bool | None]:
    """Holm's step-down: which of the family's hypotheses are rejected at family-wise level alpha.
    None p-values (untestable) stay None and do not count in the family."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out: list[bool | None] = [None] * len(pvalues)
    rejecting = True
    for rank, i in enumerate(order):
        rejecting = rejecting and pvalues[i] <= alpha / (m - rank)
        out[i] = rejecting
    return out
