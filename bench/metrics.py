"""Sample-quality metrics on Inception features (bench/features.py): FID, KID, IS, PRDC.

Small pure functions named for the data flow, like torch-fidelity's:

    features_to_statistics    {"mu", "sigma"}   -> statistics_to_fid
    features_to_fid           FID of feature rows against reference statistics (also the Frechet distances on
                              the DINOv2 / CLIP features of eval.fd_features: the same arithmetic on other rows)
    features_to_kid / features_to_kid_unbiased / logits_to_isc / features_to_prdc
    compute_metrics           every key of bench.keys.METRIC_KEYS (None where impossible) + {key: reason}

What is whose: statistics_to_fid, features_to_kid and logits_to_isc call torch-fidelity, and features_to_prdc
calls the `prdc` package, adapting only inputs and outputs. Two are this module's own arithmetic, each tested
against the library it stands in for (tests/test_metrics.py, tests/test_stats.py): features_to_fid computes the
trace term through an N x N eigendecomposition when there are fewer samples than feature dimensions (the same
number as torch-fidelity's, faster), and KID is the unbiased MMD^2 over all rows (bench.stats.KIDResampler, with
torch-fidelity's kernel) rather than torch-fidelity's mean over random subsets.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
from prdc import compute_prdc
from torch_fidelity.metric_fid import fid_statistics_to_metric, KEY_METRIC_FID
from torch_fidelity.metric_isc import isc_features_to_metric, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD
from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD

from bench import keys as K
from bench.features import FEATURE_LOGITS, FEATURE_POOL, WEIGHTS_OPTION
from bench.keys import METRIC_KEYS
from bench.weights import DOWNLOAD

PRDC_NAMES = ("precision", "recall", "density", "coverage")  # prdc.compute_prdc's output names, as K.PRDC_KEYS


def features_to_statistics(pool: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance of pool features, float64 (torch-fidelity's fid_features_to_statistics)."""
    pool = _as_features(pool, "pool features", min_rows=2)
    x = pool.numpy()
    # Same as torch-fidelity's fid_features_to_statistics, in float64 so that cached and fresh statistics share a
    # dtype (its fid_statistics_to_metric asserts equal dtypes).
    return {"mu": np.mean(x, axis=0), "sigma": np.cov(x, rowvar=False)}


def statistics_to_fid(stats_a: dict[str, np.ndarray], stats_b: dict[str, np.ndarray]) -> float:
    """Frechet distance ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) via torch-fidelity."""
    a = {k: np.asarray(stats_a[k], dtype=np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(stats_b[k], dtype=np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape or a["sigma"].shape != b["sigma"].shape:
        raise ValueError(f"FID statistics differ in shape: mu {a['mu'].shape} vs {b['mu'].shape}")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def features_to_fid(stats_ref: dict[str, np.ndarray], pool: torch.Tensor | np.ndarray) -> float:
    """FID of feature rows (N, D) against reference statistics, exactly as statistics_to_fid.

    With fewer rows than dimensions (N <= D: a few hundred samples on 2048-d features) the sample covariance
    S_f = Xc^T Xc / (N - 1) has rank < N, and S_r S_f shares its nonzero eigenvalues with the N x N matrix
    Xc S_r Xc^T / (N - 1) (AB and BA have the same nonzero spectrum). Tr((S_r S_f)^(1/2)) then needs an N x N
    symmetric eigendecomposition instead of torch-fidelity's general 2048 x 2048 one (seconds on a CPU, per FID).
    Otherwise this is torch-fidelity's function.
    """
    x = pool.double().cpu().numpy() if torch.is_tensor(pool) else np.asarray(pool, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 feature rows, got {n}")
    if n > d:
        return statistics_to_fid(stats_ref, features_to_statistics(torch.from_numpy(x)))
    mu_r, sigma_r = np.asarray(stats_ref["mu"], np.float64), np.asarray(stats_ref["sigma"], np.float64)
    if mu_r.shape != (d,):
        raise ValueError(f"FID statistics differ in shape: mu {mu_r.shape} vs {(d,)}")
    mu_f = x.mean(0)
    xc = x - mu_f  # (N, D)
    small = xc @ sigma_r @ xc.T / (n - 1)  # (N, N), symmetric PSD
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0.0, None)).sum()
    diff = mu_r - mu_f
    tr_f = np.einsum("ij,ij->", xc, xc) / (n - 1)
    return float(diff @ diff + np.trace(sigma_r) + tr_f - 2 * tr_covmean)


def features_to_kid(
    pool_a: torch.Tensor,
    pool_b: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
) -> tuple[float, float]:
    """KID (polynomial-kernel unbiased MMD^2 over random subsets) via torch-fidelity: (mean, std over subsets).

    subset_size is clipped to the smaller set, so small sample counts still give a (noisier) number.
    """
    pool_a = _as_features(pool_a, "pool features (a)", min_rows=2)
    pool_b = _as_features(pool_b, "pool features (b)", min_rows=2)
    size = min(subset_size, len(pool_a), len(pool_b))
    out = kid_features_to_metric(
        pool_a, pool_b, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def kid_rows(real_pool: Any, fake_pool: Any, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows KID uses: every real and fake row, or seeded subsamples of at most max_rows per side (its kernel
    matrices are n x n). The bootstrap of KID's interval resamples exactly these fake rows."""
    real = subsample_rows(_as_features(real_pool, "real pool features", min_rows=2).numpy(), max_rows, seed + 12)
    fake = subsample_rows(_as_features(fake_pool, "fake pool features", min_rows=2).numpy(), max_rows, seed + 11)
    return real, fake


def features_to_kid_unbiased(real: Any, fake: Any) -> float:
    """KID as the unbiased MMD^2 of all fake rows against all real rows with torch-fidelity's kernel
    k(x, y) = (x.y / d + 1)^3: the value torch-fidelity's mean over random subsets estimates, without the
    noise of which rows its subsets drew. With equal set sizes and one subset holding everything it is
    torch-fidelity's KID exactly (tests/test_stats.py)."""
    from bench.stats import KIDResampler

    fake = np.asarray(fake, np.float64)
    return KIDResampler(np.asarray(real, np.float64), fake)(np.arange(len(fake)))


def logits_to_isc(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) via torch-fidelity: (mean, std over splits).

    splits is clipped to the number of samples (each split needs at least one).
    """
    logits = _as_features(logits, "logits", min_rows=1)
    out = isc_features_to_metric(logits, splits=min(splits, len(logits)), shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def sample_rows(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random sample of n of n_total rows (all rows when n is None or >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=int(n), replace=False))


def subsample_rows(x: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """At most `max_rows` rows of x, drawn without replacement by a seeded generator (kept in original order)."""
    return x if len(x) <= max_rows else x[sample_rows(len(x), max_rows, seed)]


def prdc_rows(real: Any, fake: Any, max_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows PRDC uses, as float64 arrays: seeded subsamples of at most max_samples per side (its distance
    matrices are n x n). The intervals of PRDC (bench.stats.prdc_estimates) resample exactly these fake rows."""
    real, fake = (np.asarray(x.numpy() if torch.is_tensor(x) else x, np.float64) for x in (real, fake))
    return subsample_rows(real, max_samples, seed), subsample_rows(fake, max_samples, seed + 1)


def features_to_prdc(
    real_pool: torch.Tensor,
    fake_pool: torch.Tensor,
    k: int = 5,
    max_samples: int = 10000,
    seed: int = 0,
) -> dict[str, float]:
    """Precision, recall, density, coverage (Naeem et al. 2020) via `prdc.compute_prdc`.

    Each side is subsampled (seeded) to at most max_samples rows first: prdc builds dense N x N distance
    matrices, so memory grows with the square of the sample count.
    """
    real, fake = prdc_rows(_as_features(real_pool, "real pool features", min_rows=k + 1),
                           _as_features(fake_pool, "fake pool features", min_rows=k + 1), max_samples, seed)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"PRDC with k={k} needs more than k samples per side after subsampling (max_samples={max_samples})")
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the sample counts
        out = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {key: float(out[name]) for key, name in zip(K.PRDC_KEYS, PRDC_NAMES)}


NO_LOGITS_REASON = (
    "no Inception logits: offline FID Inception (default_1.pt) has pool features only; "
    f"pass {WEIGHTS_OPTION}={DOWNLOAD} (torch-fidelity's file, fetched once) or {WEIGHTS_OPTION}=PATH"
)


def compute_metrics(
    real_pool: torch.Tensor | None,
    fake: dict[str, torch.Tensor],
    real_stats: dict[str, np.ndarray] | None = None,
    prdc_k: int = 5,
    prdc_samples: int = 10000,
    isc_splits: int = 10,
    seed: int = 0,
    real_prdc: torch.Tensor | None = None,
    resamplers: dict[str, Any] | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """All sample metrics of `fake` features against the real reference.

    real_pool: (N_real, 2048) reference features (None if only statistics are cached: KID and PRDC then unavailable).
    fake: images_to_features output for the samples.
    real_stats: cached features_to_statistics(real_pool); computed from real_pool when None.
    real_prdc: the real rows PRDC compares with (the protocol passes as many as there are fakes); real_pool when None.
    resamplers: if given, receives the bench.stats.KIDResampler that gave KID ("kid"), so the protocol's interval
    resamples the same kernel matrices instead of building them again (n x n each, n up to prdc_samples).
    Returns (metrics, unavailable): every METRIC_KEYS entry, None where it cannot be computed, and for each None a
    one-line reason in unavailable.

    One function on purpose: each metric's block is the rule for when it can be computed beside the call that
    computes it, four short blocks in a row; the KID block also hands its resampler to the intervals.
    """
    metrics: dict[str, float | None] = {k: None for k in METRIC_KEYS}
    unavailable: dict[str, str] = {}

    def skip(keys: tuple[str, ...], reason: str) -> None:
        for key in keys:
            unavailable[key] = reason

    if FEATURE_POOL not in fake:
        raise ValueError(f"fake features need a {FEATURE_POOL!r} entry, got keys {sorted(fake)}")
    fake_pool = fake[FEATURE_POOL]
    n_fake = len(fake_pool)
    n_real = None if real_pool is None else len(real_pool)

    # FID
    if real_stats is None and real_pool is None:
        skip((K.FID,), "no real reference: neither features nor statistics given")
    elif n_fake < 2 or (real_stats is None and n_real < 2):
        skip((K.FID,), f"FID needs at least 2 samples per side (fake {n_fake}, real {n_real})")
    else:
        stats_real = real_stats if real_stats is not None else features_to_statistics(real_pool)
        metrics[K.FID] = features_to_fid(stats_real, fake_pool)

    # KID
    if real_pool is None:
        skip((K.KID_MEAN,), "no real reference features (only statistics): KID needs features")
    elif min(n_fake, n_real) < 2:
        skip((K.KID_MEAN,), f"KID needs at least 2 samples per side (fake {n_fake}, real {n_real})")
    else:
        from bench.stats import KIDResampler

        kid = KIDResampler(*kid_rows(real_pool, fake_pool, prdc_samples, seed))
        metrics[K.KID_MEAN] = kid(np.arange(kid.n))  # = features_to_kid_unbiased of these rows
        if resamplers is not None:
            resamplers["kid"] = kid

    # IS: of the samples alone
    is_keys = (K.IS_MEAN, K.IS_STD)
    if FEATURE_LOGITS not in fake:
        skip(is_keys, NO_LOGITS_REASON)
    else:
        metrics[K.IS_MEAN], metrics[K.IS_STD] = logits_to_isc(fake[FEATURE_LOGITS], splits=isc_splits, seed=seed + 2020)

    # PRDC
    prdc_keys = K.PRDC_KEYS
    if real_pool is None:
        skip(prdc_keys, "no real reference features (only statistics): PRDC needs features")
    elif min(n_fake, n_real, prdc_samples) <= prdc_k:
        skip(prdc_keys, f"PRDC with k={prdc_k} needs more than k samples per side (fake {n_fake}, real {n_real})")
    else:
        metrics.update(features_to_prdc(real_pool if real_prdc is None else real_prdc, fake_pool, k=prdc_k,
                                        max_samples=prdc_samples, seed=seed))

    return metrics, unavailable


def _as_features(x: Any, what: str, min_rows: int) -> torch.Tensor:
    """A 2-D float64 CPU tensor with at least min_rows rows, or a readable ValueError."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"{what} must be a 2-D (N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if len(x) < min_rows:
        raise ValueError(f"{what}: need at least {min_rows} rows, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    return x.detach().to("cpu", torch.float64)
