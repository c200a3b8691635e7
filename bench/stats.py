"""Uncertainty and significance for the evaluation protocol (docs/design.md, "Evaluation"). numpy/scipy only.

Sample metrics (FID, KID, PRDC, completion FID) get a bootstrap over the generated samples with the real
reference held fixed: every number in a table column is measured against the same reference at the same N, so
the reference is a shared constant of the comparison, not a source of its noise. Each bootstrap replicate
recomputes the metric exactly on the resampled features, through precomputed Gram / distance matrices
(`FIDResampler`, `KIDResampler`, `PRDCResampler`, each tested equal to the direct computation on the
resampled rows).

Resampling with replacement duplicates rows, which biases FID/KID/PRDC of a replicate (FID up, recall down).
The interval therefore uses the bootstrap only for the spread: point +- z * sd(replicates), i.e. an interval
for the metric *at this N* (the quantity compared in a column), with no shift by the duplicate bias.

PRDC is the exception. Recall and coverage are shares of the *real* rows whose value depends on the nearest fake
neighbours; a bootstrap replicate holds only ~63% distinct fakes, and its spread was measured up to 2x too narrow
(Gaussian features, A/A false-positive rate 30% for coverage). PRDC therefore uses the delete-d jackknife
(Shao & Wu 1989), which stays consistent for such non-smooth statistics: replicates on random subsets of
r = 3n/4 distinct fakes (d = n/4 deleted), variance = r / d * var(replicates). Recall and coverage also get a
floor on their standard error, the binomial sqrt(p (1 - p) / m) of a share of m real rows with p clipped to
[1/m, 1 - 1/m]: near 0 or 1 a share barely moves under any resampling, but another sample set still can flip
a real row. tests/test_stats.py checks the false-positive rate on Gaussians with both.
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
    KEEP = 0.75  # delete-d jackknife subsets keep 3/4 of the fakes (module docstring)

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


def bootstrap(stat: Callable[[np.ndarray], float | np.ndarray], n: int, resamples: int, seed: int) -> np.ndarray:
    """stat(idx) over `resamples` bootstrap index sets: (resamples,) or (resamples, k)."""
    return np.stack([np.asarray(stat(idx)) for idx in bootstrap_indices(n, resamples, seed)])


def prdc_estimates(real: np.ndarray, fake: np.ndarray, k: int, values: dict[str, float], resamples: int,
                   seed: int) -> dict[str, Estimate]:
    """The four PRDC metrics of `values` (computed on all rows) with delete-d jackknife standard errors."""
    prdc = PRDCResampler(real, fake, k)
    n = len(fake)
    idx = delete_d_indices(n, resamples, seed, PRDCResampler.KEEP)
    reps = np.stack([prdc(i) for i in idx])
    return {name: delete_d_estimate(values[name], reps[:, j], n, idx.shape[1], name,
                                    share_of=len(real) if name in PRDCResampler.SHARES_OF_REAL else None)
            for j, name in enumerate(PRDCResampler.NAMES)}


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
