"""Simulated features with a known spread of each interval metric, for tests/test_calibration.py and
benchmarks/interval_calibration.py.

A setting draws fake features from a Gaussian (a low-rank or a power-law spectrum) against one fixed reference
draw, R times independently: the standard deviation of the metric over those R sample sets is its true spread at
this N (the reference held fixed, as in a table column). The estimator under test reports a standard error on S of
the same sets; calibration = sqrt(mean se^2) / true spread, which is 1 for a correct estimator.

Its Monte Carlo error is computed from the replicates, not assumed: the sample sd of R values has
var(log sd) ~ (kurtosis - 1) / (4 R), and the rms of S standard errors has
var(log rms) ~ var(se^2) / (4 S mean(se^2)^2).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bench import metrics as M
from bench import stats as S

OLD_RESAMPLES = 200  # eval.bootstrap's default: the bootstrap the intervals used before subsampling
RESAMPLES = 200


@dataclass(frozen=True)
class Setting:
    """One simulated comparison: n fakes of dimension d against m reals, a spectrum and the fakes' offset."""
    name: str
    n: int
    d: int
    spectrum: str = "lowrank"  # "lowrank": rank `rank`, equal variances; "power": lambda_i ~ i^-1 over all d
    rank: int = 64
    shift: float = 0.0  # fakes' mean offset per dimension, in units of the reference's per-dimension sd
    scale: float = 1.0  # fakes' sd relative to the reference's
    m: int = 1000  # reference rows (eval.num_reference)

    def spectrum_sd(self) -> np.ndarray:
        """Per-dimension sd, normalised to total variance 0.2 d (Inception pool features' order of magnitude)."""
        if self.spectrum == "lowrank":
            lam = np.zeros(self.d)
            lam[:self.rank] = 1.0
        elif self.spectrum == "power":
            lam = 1.0 / np.arange(1, self.d + 1)
        else:
            raise ValueError(self.spectrum)
        lam *= 0.2 * self.d / lam.sum()
        return np.sqrt(lam)

    def draw(self, rows: int, seed: int, fake: bool) -> np.ndarray:
        sd = self.spectrum_sd()
        z = np.random.default_rng(seed).standard_normal((rows, self.d))
        if not fake:
            return 0.4 + z * sd
        return 0.4 + self.shift * sd + z * sd * self.scale


def fid_value(real: np.ndarray) -> Callable[[np.ndarray], tuple[float, S.FIDResampler]]:
    stats = M.features_to_statistics(torch.from_numpy(real))

    def make(fake: np.ndarray):
        fid = S.FIDResampler(stats["mu"], stats["sigma"], fake)
        return fid(np.arange(len(fake))), fid
    return make


# ---- estimators: (features, seed) -> (value, se) ------------------------------------------------------------

def fid_estimator(real: np.ndarray, old: bool) -> Callable[[np.ndarray, int], tuple[float, float]]:
    make = fid_value(real)

    def est(fake: np.ndarray, seed: int) -> tuple[float, float]:
        value, fid = make(fake)
        if old:
            return value, S.bootstrap_estimate(value, S.bootstrap(fid, len(fake), OLD_RESAMPLES, seed)).se
        return value, S.subsample_estimate(value, fid, len(fake), RESAMPLES, seed).se
    return est


def fid_value_only(real: np.ndarray) -> Callable[[np.ndarray], float]:
    make = fid_value(real)
    return lambda fake: make(fake)[0]


def kid_estimator(real: np.ndarray, old: bool) -> Callable[[np.ndarray, int], tuple[float, float]]:
    make = kid_resamplers(real)

    def est(fake: np.ndarray, seed: int) -> tuple[float, float]:
        kid = make(fake)
        if old:
            value = kid(np.arange(kid.n))
            return value, S.bootstrap_estimate(value, S.bootstrap(kid, kid.n, OLD_RESAMPLES, seed)).se
        e = kid.estimate()
        return e.value, e.se
    return est


def kid_value_only(real: np.ndarray) -> Callable[[np.ndarray], float]:
    make = kid_resamplers(real)
    return lambda fake: make(fake)(np.arange(len(fake)))


def is_logits(setting: Setting, rows: int, seed: int) -> np.ndarray:
    """Logits of `setting.d` classes: Gaussian scores whose sd (3 x scale) sets how peaked p(y|x) is; `shift`
    favours the first tenth of the classes (a less diverse model)."""
    z = np.random.default_rng(seed).standard_normal((rows, setting.d)) * 3.0 * setting.scale
    z[:, :max(1, setting.d // 10)] += setting.shift
    return z


def is_estimator(splits: int = 10, seed: int = 2020) -> Callable[[np.ndarray, int], tuple[float, float]]:
    """IS of the logits (bench.stats.ISResampler, tested equal to torch-fidelity) with its bootstrap standard error
    (the protocol's: IS stays on the bootstrap, see bench/stats.py)."""
    def est(logits: np.ndarray, s: int) -> tuple[float, float]:
        isc = S.ISResampler(logits, splits, seed)
        value = isc(np.arange(isc.n))
        return value, S.bootstrap_estimate(value, S.bootstrap(isc, isc.n, RESAMPLES, s)).se
    return est


def is_value_only(splits: int = 10, seed: int = 2020) -> Callable[[np.ndarray], float]:
    return lambda logits: S.ISResampler(logits, splits, seed)(np.arange(len(logits)))


def prdc_estimator(real: np.ndarray, k: int = 5) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """PRDC of the fakes against n fixed reals with its delete-d jackknife standard errors (bench.stats)."""
    def est(fake: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        values = dict(zip(S.PRDCResampler.NAMES, S.PRDCResampler(real, fake, k)(np.arange(len(fake)))))
        e = S.prdc_estimates(real, fake, k, values, RESAMPLES, seed)
        return (np.array([e[name].value for name in S.PRDCResampler.NAMES]),
                np.array([e[name].se for name in S.PRDCResampler.NAMES]))
    return est


@dataclass
class Calibration:
    """sqrt(mean se^2) / sd over independent sample sets, per metric component, with its Monte Carlo sd (log scale)."""
    names: tuple[str, ...]
    ratio: np.ndarray
    log_sd: np.ndarray  # Monte Carlo sd of log(ratio)
    true_sd: np.ndarray
    values: np.ndarray = field(repr=False)  # (R, k) metric over the independent sets
    ses: np.ndarray = field(repr=False)  # (S, k) reported standard errors

    def band(self, claim: tuple[float, float], z: float) -> tuple[np.ndarray, np.ndarray]:
        """The observed ratio's acceptance band when the true ratio lies in `claim`: widened by z Monte Carlo sds."""
        return claim[0] * np.exp(-z * self.log_sd), claim[1] * np.exp(z * self.log_sd)


def calibrate(names: tuple[str, ...], draw: Callable[[int], np.ndarray], value: Callable[[np.ndarray], np.ndarray],
              estimate: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], replicates: int, with_se: int,
              seed: int = 1000) -> Calibration:
    """R = `replicates` independent sample sets (draw(seed + i)) give the true spread; the first `with_se` of them
    also get the estimator's standard errors."""
    values, ses = [], []
    for i in range(replicates):
        x = draw(seed + i)
        if i < with_se:
            v, se = estimate(x, i)
            ses.append(np.atleast_1d(np.asarray(se, np.float64)))
        else:
            v = value(x)
        values.append(np.atleast_1d(np.asarray(v, np.float64)))
    values, ses = np.array(values), np.array(ses)
    sd = values.std(0, ddof=1)
    ms2 = (ses ** 2).mean(0)
    ratio = np.sqrt(ms2) / sd
    centred = values - values.mean(0)
    kurtosis = (centred ** 4).mean(0) / np.maximum((centred ** 2).mean(0), 1e-300) ** 2
    var_log_sd = (kurtosis - 1) / (4 * replicates)
    var_log_rms = (ses ** 2).var(0, ddof=1) / (4 * with_se * ms2 ** 2)
    return Calibration(names, ratio, np.sqrt(var_log_sd + var_log_rms), sd, values, ses)


def kid_resamplers(real: np.ndarray) -> Callable[[np.ndarray], S.KIDResampler]:
    """KIDResampler(real, fake) for many fake sets against one reference, its real-real term computed once."""
    base = S.KIDResampler(real, real[:2])

    def make(fake: np.ndarray) -> S.KIDResampler:
        kid = copy.copy(base)
        kid.n = len(fake)
        kid.k_ff = S.polynomial_kernel(fake, fake)
        kid.k_fr_mean = S.polynomial_kernel(fake, real).mean(1)
        return kid
    return make


def recalled_grids(train: torch.Tensor, n: int, noise: float, seed: int) -> torch.Tensor:
    """A prior that recalls random training grids with a share `noise` of positions redrawn uniformly (16 codes)."""
    g = torch.Generator().manual_seed(seed)
    x = train[torch.randint(0, len(train), (n,), generator=g)].clone()
    redraw = torch.rand(x.shape, generator=g) < noise
    return torch.where(redraw, torch.randint(0, 16, x.shape, generator=g), x)


def train_match_estimator(train: torch.Tensor) -> Callable[[torch.Tensor, int], tuple[np.ndarray, np.ndarray]]:
    from bench.evaluate import train_match_metrics

    def est(grids: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
        out = train_match_metrics(grids, train)
        return np.array([out["train_match"]]), np.array([out["train_match_se"]])
    return est
