"""The evaluation protocol (docs/design.md, "Evaluation"), one code path for every prior.

    reference   Inception features of a seeded random sample of the train split (cached once)
    baselines   real val images and the tokenizer's reconstructions of them, at each column's N (cached once)
    a job       NLL per validation sequence; samples, their metrics with intervals; upper-half
                completion FID on a seeded random sample of val; speed at batch 50 after a warm-up batch;
                how close the samples' token grids come to training grids (train_match, train_copies)
    fd          with eval.fd_features: each extractor's reference features of the same train rows (cached once),
                and the Frechet distance of the samples and of the baseline rows against it (fd_<extractor>)

Every FID-type number of a column is computed at the same N against the same reference: sample metrics at
N = eval.num_samples, completion FID at N = eval.completion_samples (clipped to the val split), and PRDC with
equal real and fake counts (the reference subsampled, seeded). Intervals and tests: bench/stats.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from bench import device as D
from bench import features as FE
from bench import keys as K
from bench import metrics as M
from bench import stats as S
from bench.cache import atomic_torch_save, atomic_write_json, cached_stage, content_key, move_aside
from bench.data import ImageData
from bench.errors import ConfigError
from bench.keys import BASELINE_KEYS, bound_key
from bench.options import COMPILE_MODES, EvalConfig
from bench.tokens import TokenSet, decode_tokens
from priors.base import Prior
from priors.flops import matmul_peak_flops, sample_flops_per_image
from priors.roofline import read_bandwidth, roofline_seconds, sample_bytes

log = logging.getLogger(__name__)

# Seeds of the protocol's random draws, offset from eval.split_seed: the same draws for every job of a sweep.
REFERENCE_DRAW, VAL_DRAW, COMPLETION_DRAW, PRDC_DRAW = 0, 1, 2, 3


def completion_rows(n_val: int, cfg: EvalConfig) -> np.ndarray:
    """The val images every job completes (and the completion baselines use)."""
    return M.sample_rows(n_val, cfg.completion_samples, cfg.split_seed + COMPLETION_DRAW)


# ---- reference features -------------------------------------------------

def reference_key(data_key: str, weights_sha256: str, cfg: EvalConfig) -> str:
    """Keyed by the extractor weights' content: two weight files of the same name never share a reference."""
    return content_key("reference-v2", data_key, weights_sha256, cfg.num_reference, cfg.split_seed)


def build_reference(data: ImageData, extractor: FE.FeatureExtractor, cfg: EvalConfig, cache_root: Path
                    ) -> tuple[Path, str]:
    key = reference_key(data.key, extractor.weights_sha256, cfg)

    def build(tmp: Path) -> dict[str, Any]:
        rows = M.sample_rows(len(data.train), cfg.num_reference, cfg.split_seed + REFERENCE_DRAW)
        t0 = time.time()
        images = data.train if len(rows) == len(data.train) else data.train[rows]  # the whole split: no copy
        feats = FE.images_to_features(torch.from_numpy(images), extractor, batch_size=cfg.feature_batch_size,
                                      progress=True)
        seconds = time.time() - t0
        torch.save({k: v.cpu() for k, v in feats.items()}, tmp / "features.pt")
        np.save(tmp / "rows.npy", rows)
        np.savez(tmp / "statistics.npz", **M.features_to_statistics(feats[FE.FEATURE_POOL]))
        return {"extractor": extractor.name, "weights_sha256": extractor.weights_sha256, "n": len(rows),
                "n_train": len(data.train), "seconds": seconds, "images_per_second": len(rows) / max(seconds, 1e-9)}

    return cached_stage(cache_root, "reference", key, build, what="reference features"), key


def load_reference(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    feats = torch.load(d / "features.pt", map_location="cpu", weights_only=True)
    return feats, dict(np.load(d / "statistics.npz"))


# ---- Frechet distances on other extractors (eval.fd_features) --------------

@dataclass
class FDFeatures:
    """One extractor of eval.fd_features: its network, or why its distance is n/a; its reference once built."""
    name: str  # torch-fidelity's extractor name
    key: K.Key  # its result key (K.FD_KEYS)
    extractor: FE.FeatureExtractor | FE.PlannedFD | None  # PlannedFD at stage=plan (plan_fd): its weights file only
    reason: str | None = None  # why extractor is None
    ref_key: str | None = None  # set by build_fd_references
    ref_stats: dict[str, np.ndarray] | None = None


def load_fd(cfg: EvalConfig, device: str = "cpu") -> list[FDFeatures]:
    """The extractors eval.fd_features selects, each with the weights eval.fd_weights names (bench/features.py);
    one whose weights are not at hand and were not asked for is kept with its reason (its distance is n/a)."""
    out = []
    for name in cfg.fd_features:
        try:
            out.append(FDFeatures(name, K.FD_KEYS[name], FE.load_fd_extractor(name, cfg.fd_weights.get(name), device)))
        except FE.FDUnavailable as e:
            out.append(FDFeatures(name, K.FD_KEYS[name], None, str(e)))
    return out


def plan_fd(cfg: EvalConfig) -> list[FDFeatures]:
    """load_fd for stage=plan: each extractor's weights file found and hashed for the cache keys, no network built
    and nothing downloaded. Weights that the job would download first are not there to hash: such an extractor
    keys as n/a here, and its stages show as to run (nothing with its reference can be cached before the file)."""
    out = []
    for name in cfg.fd_features:
        try:
            planned = FE.plan_fd_extractor(name, cfg.fd_weights.get(name))
            reason = None if planned else "weights not downloaded yet (the job downloads them)"
            out.append(FDFeatures(name, K.FD_KEYS[name], planned, reason))
        except FE.FDUnavailable as e:
            out.append(FDFeatures(name, K.FD_KEYS[name], None, str(e)))
    return out


def fd_reference_key(data_key: str, fd: FDFeatures, cfg: EvalConfig) -> str:
    """Cache key of an extractor's reference features (the FID reference's train rows): by the extractor's name and
    its weights' content, so two weight files never share a reference."""
    return content_key("fd-reference-v1", data_key, fd.name, fd.extractor.weights_sha256, cfg.num_reference,
                       cfg.split_seed)


def fd_key_part(fds: list[FDFeatures], data_key: str, cfg: EvalConfig) -> list[Any]:
    """What the selected extractors add to the baselines' and evaluation's cache keys: each one's reference key
    (or that it is n/a); nothing when none is selected, so the default keys are those without the option."""
    return [[fd.name, None if fd.extractor is None else fd_reference_key(data_key, fd, cfg)] for fd in fds]


def eval_options_for_key(options: dict[str, Any]) -> dict[str, Any]:
    """eval's options as the evaluation's cache key reads them: the extractors enter through fd_key_part (names
    and weights' content), so a default config keys as it did before the options existed."""
    return {k: v for k, v in options.items() if k not in ("fd_features", "fd_weights")}


def build_fd_references(fds: list[FDFeatures], data: ImageData, cfg: EvalConfig, cache_root: Path) -> None:
    """Each available extractor's features of the same seeded train sample as the FID reference, cached once."""
    rows = M.sample_rows(len(data.train), cfg.num_reference, cfg.split_seed + REFERENCE_DRAW)
    for fd in fds:
        if fd.extractor is None:
            continue
        fd.ref_key = fd_reference_key(data.key, fd, cfg)

        def build(tmp: Path, fd: FDFeatures = fd) -> dict[str, Any]:
            t0 = time.time()
            feats = FE.images_to_features(torch.from_numpy(data.train[rows]), fd.extractor,
                                          batch_size=cfg.feature_batch_size, progress=True)[FE.FEATURE_FD]
            torch.save(feats.cpu(), tmp / "features.pt")
            np.save(tmp / "rows.npy", rows)
            np.savez(tmp / "statistics.npz", **M.features_to_statistics(feats))
            return {"extractor": fd.extractor.name, "weights_sha256": fd.extractor.weights_sha256, "n": len(rows),
                    "seconds": time.time() - t0}

        d = cached_stage(cache_root, "fd-reference", fd.ref_key, build, what=f"{fd.name} reference features")
        fd.ref_stats = dict(np.load(d / "statistics.npz"))


def fd_features(fds: list[FDFeatures], images: torch.Tensor, cfg: EvalConfig) -> dict[str, torch.Tensor]:
    """{FD_FEATURE_PREFIX + name: features} of `images` for each selected extractor that has its weights."""
    return {FD_FEATURE_PREFIX + fd.name: FE.images_to_features(images, fd.extractor,
                                                               batch_size=cfg.feature_batch_size)[FE.FEATURE_FD]
            for fd in fds if fd.extractor is not None}


FD_FEATURE_PREFIX = "fd/"  # fd_features' keys beside the Inception features of a FeatureStream


def fd_metrics(fds: list[FDFeatures], features: dict[str, torch.Tensor], cfg: EvalConfig, seed: int
               ) -> tuple[dict[str, Any], dict[str, str], dict[str, torch.Tensor]]:
    """Each selected extractor's Frechet distance of the images whose fd_features are `features` against its
    reference, with FID's interval (fid_with_interval: the same arithmetic and subsampling); n/a with the reason
    where its weights are missing. Returns (results, unavailable, {name: features})."""
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for fd in fds:
        if fd.extractor is None:
            results[fd.key] = None
            unavailable[fd.key] = fd.reason
            continue
        x = features[FD_FEATURE_PREFIX + fd.name]
        out[fd.name] = x.float().cpu()
        results.update(fid_with_interval(fd.ref_stats, x.double().numpy(), cfg.bootstrap, seed).as_results(fd.key))
    return results, unavailable, out


# ---- metrics with intervals -----------------------------------------------

def fid_with_interval(ref_stats: dict[str, np.ndarray], pool: np.ndarray, resamples: int, seed: int,
                      value: float | None = None) -> S.Estimate:
    """FID (bench.metrics.features_to_fid, tested equal to torch-fidelity; `value` if already computed) with its
    interval from subsampling without replacement (bench.stats.subsample_estimate)."""
    value = M.features_to_fid(ref_stats, pool) if value is None else value
    fid = S.FIDResampler(ref_stats["mu"], ref_stats["sigma"], pool)
    return S.subsample_estimate(value, fid, len(pool), resamples, seed, K.FID)


def sample_metrics(ref_pool: torch.Tensor, ref_stats: dict[str, np.ndarray], fake: dict[str, torch.Tensor],
                   cfg: EvalConfig, seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """FID, KID, IS, PRDC of one sample set against the reference, each with `<key>_ci` and `<key>_se`.

    Point values come from bench.metrics (torch-fidelity, prdc); PRDC uses as many reference rows as there are
    samples (seeded subsample). Intervals, the reference fixed (bench.stats): FID from eval.bootstrap subsets of
    the samples drawn without replacement at two sizes; KID from its U-statistic variance; PRDC from subsets at
    two sizes; IS from eval.bootstrap resamples."""
    n = len(fake[FE.FEATURE_POOL])
    resamples = cfg.bootstrap
    real_prdc = M.subsample_rows(ref_pool.double().numpy(), n, cfg.split_seed + PRDC_DRAW)
    resamplers: dict[str, Any] = {}
    values, missing = M.compute_metrics(ref_pool, fake, real_stats=ref_stats, real_prdc=torch.from_numpy(real_prdc),
                                        prdc_k=cfg.prdc_k, prdc_samples=cfg.prdc_samples,
                                        isc_splits=cfg.isc_splits, seed=seed, resamplers=resamplers)
    out: dict[str, Any] = dict(values)
    pool = fake[FE.FEATURE_POOL].double().numpy()
    if values.get(K.FID) is not None:
        out.update(fid_with_interval(ref_stats, pool, resamples, seed, value=values[K.FID]).as_results(K.FID))
    if values.get(K.KID_MEAN) is not None:
        kid = resamplers["kid"]
        out.update(kid.estimate().as_results(K.KID_MEAN))
    if values.get(K.PRDC_PRECISION) is not None:
        # the rows the value was computed on (at most eval.prdc_samples per side), not all N: n x n distances
        prdc_real, prdc_fake = M.prdc_rows(real_prdc, pool, cfg.prdc_samples, seed)
        for name, est in S.prdc_estimates(prdc_real, prdc_fake, cfg.prdc_k, values, resamples, seed + 2).items():
            out.update(est.as_results(name))
    if values.get(K.IS_MEAN) is not None:
        logits = fake[FE.FEATURE_LOGITS].double().numpy()
        isc = S.ISResampler(logits, min(cfg.isc_splits, n), seed + 2020)  # logits_to_isc's splits and seed
        out.update(S.bootstrap_estimate(values[K.IS_MEAN], S.bootstrap(isc, n, resamples, seed + 3), K.IS_MEAN)
                   .as_results(K.IS_MEAN))
    out[K.N_BOOTSTRAP] = resamples
    return out, missing


# ---- closeness to the training set ----------------------------------------

def train_match(samples: torch.Tensor, train: torch.Tensor, device: torch.device | str = "cpu",
                max_cells: int = 2 ** 26) -> np.ndarray:
    """Per sample token grid (N, L): the largest share of its L positions that hold the same code as one training
    grid (M, L), i.e. 1 - the normalised Hamming distance to its nearest training grid; 1.0 is an exact copy.
    Exact over all M training grids, in chunks of at most `max_cells` compared tokens (a chunk is a block of
    sample rows against a block of training grids, both cut when M x L alone exceeds it).

    Memory: the codes in the narrowest integer type that holds them, and per chunk one byte per compared token;
    its agreement counts are summed in uint8 over blocks of at most 255 positions, so no wider copy of the chunk
    is made (a plain sum over a bool tensor would cast it to int64, eight bytes per compared token)."""
    if samples.ndim != 2 or train.ndim != 2 or samples.shape[1] != train.shape[1]:
        raise ValueError(f"token grids of different lengths: samples {tuple(samples.shape)}, "
                         f"train {tuple(train.shape)}")
    n, L = samples.shape
    if n == 0:
        return np.zeros(0)
    if len(train) == 0 or L == 0:
        raise ValueError(f"train match needs training grids of at least one token, got train {tuple(train.shape)}")
    codes = code_dtype(samples, train)
    train = train.to(device, codes)
    per_block = L // position_blocks(L)
    grids = max(1, min(len(train), max_cells // L))  # training grids per chunk
    rows = max(1, max_cells // (grids * L))  # sample rows per chunk
    best = torch.empty(n, dtype=torch.long)
    for i in range(0, n, rows):
        s = samples[i:i + rows].to(device, codes)
        top = torch.zeros(len(s), dtype=torch.long, device=device)
        for j in range(0, len(train), grids):
            # one expression: the (rows, grids, L) comparison is freed before the next chunk's is made
            top = torch.maximum(top, (s[:, None, :] == train[None, j:j + grids, :]).view(torch.uint8)
                                .unflatten(-1, (-1, per_block)).sum(-1, dtype=torch.uint8).sum(-1).amax(1))
        best[i:i + rows] = top.cpu()
    return best.double().numpy() / L


def code_dtype(*grids: torch.Tensor) -> torch.dtype:
    """The narrowest signed integer type holding every code of the grids (token ids are >= 0)."""
    top = max(int(g.max()) for g in grids)
    return next(t for t in (torch.int16, torch.int32, torch.int64) if top <= torch.iinfo(t).max)


def position_blocks(L: int) -> int:
    """The fewest equal blocks of at most 255 positions that L splits into: a block's agreement count fits uint8."""
    return next(b for b in range(math.ceil(L / 255), L + 1) if L % b == 0)


def match_samples(n: int, cfg: EvalConfig) -> int:
    """How many of n sample grids are searched against the training set (eval.match_samples; null: all)."""
    return n if cfg.match_samples is None else min(n, cfg.match_samples)


def train_match_metrics(samples: torch.Tensor, train: torch.Tensor, device: torch.device | str = "cpu"
                        ) -> dict[str, Any]:
    """`train_match` (mean nearest-training-grid token agreement) and `train_copies` (share of samples that are
    an exact training grid), each with a 95% interval over the samples. Against a reference drawn from the train
    split, FID rewards copying: these say how much of a prior's sample quality is recall of its training set."""
    m = train_match(samples, train, device)
    mean = S.mean_estimate(m)
    out = S.bounded_estimate(mean.value, mean.se, K.TRAIN_MATCH).as_results(K.TRAIN_MATCH)
    copies = (m == 1.0).astype(np.float64)
    p, n = float(copies.mean()), len(copies)
    se = max(S.mean_estimate(copies).se or 0.0, S.binomial_se(p, n))  # a share: never below the binomial floor
    out.update(S.bounded_estimate(p, se, K.TRAIN_COPIES).as_results(K.TRAIN_COPIES))
    out[K.N_MATCH_SAMPLES] = n
    return out


# ---- baselines ------------------------------------------------------------

def baseline_row(images: np.ndarray, sample_idx: np.ndarray | None, comp: np.ndarray, match: dict[str, Any],
                 extractor: FE.FeatureExtractor, ref_feats: dict[str, torch.Tensor], ref_stats: dict[str, np.ndarray],
                 cfg: EvalConfig, fds: list[FDFeatures] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """One baseline row: the sample metrics of images[sample_idx] (None: fewer val images than the column's N)
    and the completion FID of images[comp], at the protocol's seed."""
    row: dict[str, Any] = {}
    missing: dict[str, str] = {}
    if sample_idx is not None:
        feats = FE.images_to_features(torch.from_numpy(images[sample_idx]), extractor,
                                      batch_size=cfg.feature_batch_size, progress=True)
        values, missing = sample_metrics(ref_feats[FE.FEATURE_POOL], ref_stats, feats, cfg, cfg.split_seed)
        row.update(values)
        row.update(match)
        if fds:
            fd_values, fd_missing, _ = fd_metrics(fds, fd_features(fds, torch.from_numpy(images[sample_idx]), cfg),
                                                  cfg, cfg.split_seed)
            row.update(fd_values)
            missing = {**missing, **fd_missing}
    if len(comp) >= 2:
        pool = FE.images_to_features(torch.from_numpy(images[comp]), extractor,
                                     batch_size=cfg.feature_batch_size)[FE.FEATURE_POOL].double().numpy()
        row.update(fid_with_interval(ref_stats, pool, cfg.bootstrap, cfg.split_seed).as_results(K.COMPLETION_FID))
    return row, missing


def build_baselines(key: str, data: ImageData, tokens: TokenSet, ref_dir: Path, extractor: FE.FeatureExtractor,
                    cfg: EvalConfig, cache_root: Path, fds: list[FDFeatures] = ()) -> Path:
    """Two baseline rows at each column's N (K.BASELINE_ROWS): real val images (the best a prior can reach at
    that N) and the tokenizer's reconstructions of the same images (what a perfect prior over these tokens would
    reach)."""

    def build(tmp: Path) -> dict[str, Any]:
        ref_feats, ref_stats = load_reference(ref_dir)
        n_val, n_s = len(data.val), cfg.num_samples
        comp = completion_rows(n_val, cfg)
        rows = {K.REAL_VAL: data.val, K.RECONSTRUCTION: np.load(tokens.directory / "val_reconstructions.npy")}
        out: dict[str, Any] = {K.N_SAMPLES: n_s, K.N_COMPLETIONS: len(comp), K.N_VAL: n_val, K.UNAVAILABLE: {}}
        sample_idx = M.sample_rows(n_val, n_s, cfg.split_seed + VAL_DRAW) if n_s <= n_val else None
        match: dict[str, Any] = {}
        if sample_idx is None:
            reason = f"the val split has {n_val} images, fewer than eval.num_samples={n_s}"
            out[K.UNAVAILABLE].update({k: reason for k in BASELINE_KEYS if k != K.COMPLETION_FID})  # own N, below
            out[K.UNAVAILABLE].update({fd.key: reason for fd in fds})
        else:
            # Both rows' token grids are the val images' codes (the reconstructions decode the same codes).
            match = train_match_metrics(tokens.val[torch.from_numpy(sample_idx[:match_samples(n_s, cfg)])],
                                        tokens.train)
        for name, images in rows.items():
            out[name], missing = baseline_row(images, sample_idx, comp, match, extractor, ref_feats, ref_stats, cfg,
                                              fds)
            out[K.UNAVAILABLE].update(missing)
        atomic_write_json(tmp / "baselines.json", out)
        return {K.N_SAMPLES: n_s, K.N_COMPLETIONS: len(comp)}

    return cached_stage(cache_root, "baselines", key, build, what="baselines")


# ---- helpers ------------------------------------------------------------

def save_grid(images: torch.Tensor, path: Path, nrow: int, min_tile: int = 96) -> None:
    """uint8 (N, 3, H, W) -> one PNG grid; small images are enlarged (nearest) so a grid is readable in a paper."""
    scale = max(1, min_tile // images.shape[-1])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(images.float(), nrow=nrow, padding=2, pad_value=255).round().clamp(0, 255).byte()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def upper_half_keep_mask(n: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """True on the lower half of the token grid (kept), False on the upper half (generated)."""
    h, w = grid
    rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
    return (rows >= h // 2).flatten().unsqueeze(0).expand(n, -1).clone()  # (B, L)


def held_out_nll(prior: Prior, val: torch.Tensor, batch_size: int, seed: int, device: torch.device
                 ) -> tuple[np.ndarray | None, str | None, str | None, dict[str, np.ndarray]]:
    """Per-sequence bits per token over the validation tokens: (values or None, kind, reason, extra bounds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    parts, extra, kind, reason = [], {}, None, None
    for i in tqdm(range(0, len(val), batch_size), desc="nll", unit="batch", leave=False):
        r = prior.nll(val[i:i + batch_size].to(device), generator=g)
        kind, reason = r.kind, r.reason
        if r.per_sequence is not None:
            parts.append(r.per_sequence.double().cpu().numpy())
        for k, v in r.extra.items():
            extra.setdefault(k, []).append(v.double().cpu().numpy())
    values = np.concatenate(parts) if parts else None
    return values, kind, reason, {k: np.concatenate(v) for k, v in extra.items()}


# ---- speed ----------------------------------------------------------------

def resolve_compile(want: Any, device: torch.device) -> str:
    """eval.compile: auto = the compiled decode steps on CUDA, where launching each small kernel from Python
    costs more than the math, and eager on a CPU, where compiling was measured not to pay off at these sizes."""
    want = str(want)
    if want not in COMPILE_MODES:
        raise ConfigError(f"eval.compile={want} is not one of: {', '.join(COMPILE_MODES)}")
    if want == "auto":
        return "on" if device.type == "cuda" else "off"
    return want


@functools.lru_cache(maxsize=None)
def device_peak_flops(device: str, threads: int) -> float:
    """The device's matmul peak, measured once per process (and thread count)."""
    return matmul_peak_flops(device)


@functools.lru_cache(maxsize=None)
def device_read_bandwidth(device: str, threads: int) -> float:
    """The device's read bandwidth (bytes/s), measured once per process (and thread count)."""
    return read_bandwidth(device)


def efficiency(prior: Prior, seconds_per_image: float, device: torch.device, batch: int | None = None
               ) -> dict[str, float | None]:
    """Model FLOPs per image of sample() (counted from the architecture), the FLOP/s achieved, and the sampling
    time's share of its roofline (priors/roofline.py): max(FLOPs / the measured matmul peak, bytes read at this
    batch / the measured read bandwidth) over the time; the compute bound alone when the bytes are not counted."""
    flops = sample_flops_per_image(prior)
    peak = device_peak_flops(str(device), torch.get_num_threads())
    achieved = None if flops is None else flops / seconds_per_image
    nbytes = None if batch is None or flops is None else sample_bytes(prior, batch)
    if nbytes is None:
        limit = None if flops is None else flops / peak
    else:
        bandwidth = device_read_bandwidth(str(device), torch.get_num_threads())
        limit = roofline_seconds(flops, nbytes / batch, peak, bandwidth)
    return {K.SAMPLE_FLOPS_PER_IMAGE: flops, K.ACHIEVED_FLOPS: achieved, K.PEAK_FLOPS: peak,
            K.SAMPLER_PEAK_PERCENT: None if limit is None else 100 * limit / seconds_per_image}


# ---- the evaluation ------------------------------------------------------

NLL_PART, SAMPLES_PART, METRICS_PART, COMPLETIONS_PART = "nll", "samples", "metrics", "completions"
FD_PART = "fd"
EVAL_PARTS = (NLL_PART, SAMPLES_PART, METRICS_PART, COMPLETIONS_PART, FD_PART)  # resumable parts, in order


def _plain(o: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (what json.dumps cannot write itself)."""
    return o.tolist() if hasattr(o, "tolist") else str(o)


def resumable_part(work: Path | None, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One part of the evaluation: read from `work/<name>.pt` when an interrupted run finished it, else computed
    and saved there. Its results dicts travel as JSON text, so that the file loads with weights_only=True and the
    numbers come back exactly (floats round-trip through repr)."""
    path = None if work is None else Path(work) / f"{name}.pt"
    if path is not None and path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            data[RESULTS], data[K.UNAVAILABLE] = json.loads(data[RESULTS]), json.loads(data[K.UNAVAILABLE])
            log.info("eval: %s resumed from %s", name, path)
            return data
        except Exception as e:  # noqa: BLE001 - a damaged part is recomputed, whatever torch raises
            aside = move_aside(path)
            log.warning("eval: %s cannot be read (%s); moved aside to %s, computing %s again", path,
                        type(e).__name__, aside, name)
    data = compute()
    if path is not None:
        # Plain str keys: weights_only loading accepts no other class, bench.keys.Key included.
        saved = {str(k): v for k, v in data.items()}
        saved.update({RESULTS: json.dumps(data[RESULTS], default=_plain),
                      str(K.UNAVAILABLE): json.dumps(data[K.UNAVAILABLE], default=_plain)})
        atomic_torch_save(saved, path)
    return data


RESULTS = "results"  # each part's entry holding its results-dict share (next to K.UNAVAILABLE and its arrays)


def part(results: dict[str, Any], unavailable: dict[str, str] | None = None, **arrays: Any) -> dict[str, Any]:
    """What a part returns: its share of the results, reasons for what it left None, and its arrays."""
    return {RESULTS: results, K.UNAVAILABLE: unavailable or {}, **arrays}


@dataclass
class EvalRun:
    """What every part of one evaluation reads."""
    prior: Prior
    tokens: TokenSet
    tokenizer: Any
    extractor: FE.FeatureExtractor
    ref_feats: dict[str, torch.Tensor]
    ref_stats: dict[str, np.ndarray]
    cfg: EvalConfig
    seed: int
    device: torch.device
    precision: str
    check_stop: Callable[[str], None]
    generator: torch.Generator  # samples, then completions draw from it
    fds: list[FDFeatures] = dataclasses.field(default_factory=list)  # eval.fd_features

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return decode_tokens(self.tokenizer, x, self.tokens.inverse, self.tokens.grid, batch_size=self.cfg.batch_size,
                             device=str(self.device))

    def features(self, images: torch.Tensor, progress: bool = False) -> dict[str, torch.Tensor]:
        return FE.images_to_features(images, self.extractor, batch_size=self.cfg.feature_batch_size,
                                     progress=progress)

    def sample_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples' Inception features and, beside them, those of eval.fd_features' extractors."""
        return self.features(images) | fd_features(self.fds, images, self.cfg)


GRID_SAMPLES = 64  # samples kept as images: the samples grid and samples.npz (all are kept as tokens)


class FeatureStream:
    """Features of images that arrive in batches, extracted as they come, in the feature batches `features` would
    cut all of them into at once (so the same numbers): it holds less than one feature batch and one arriving batch
    of images, not all N (at paper scale 50,000 x 3 x 256 x 256 uint8 = 9.8 GB), and keeps the first `keep`
    images. Images past `limit` are dropped (the last sampling batch overshoots eval.num_samples). The features
    go into one (limit, ...) tensor per key, allocated at the first batch: no list of batches to concatenate, and
    no small long-lived tensors interleaved with the image batches in the allocator's heap."""

    def __init__(self, features: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch_size: int, limit: int,
                 keep: int):
        self.features, self.batch_size, self.limit, self.keep = features, batch_size, limit, keep
        self.seen = self.done = 0
        self.pending: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.out: dict[str, torch.Tensor] = {}

    def add(self, images: torch.Tensor) -> None:
        images = images[:self.limit - self.seen]
        if self.seen < self.keep:
            self.kept.append(images[:self.keep - self.seen].clone())
        self.seen += len(images)
        self.pending.append(images)
        waiting = sum(len(x) for x in self.pending)
        if waiting >= self.batch_size:
            self.extract(waiting - waiting % self.batch_size)

    def extract(self, n: int) -> None:
        """Features of the first n pending images (whole feature batches, or the rest at the end)."""
        pending = torch.cat(self.pending)
        self.pending = [pending[n:].clone()]
        for k, v in self.features(pending[:n]).items():
            if k not in self.out:
                self.out[k] = v.new_empty((self.limit, *v.shape[1:]))
            self.out[k][self.done:self.done + n] = v
        self.done += n

    def finish(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(features of every image, the kept images)."""
        rest = sum(len(x) for x in self.pending)
        if rest:
            self.extract(rest)
        return {k: v[:self.done] for k, v in self.out.items()}, torch.cat(self.kept)


def nll_part(run: EvalRun, parts: dict[str, Any]) -> dict[str, Any]:
    """NLL on held-out tokens, per sequence, so every prior's stderr means the same and pairs can be compared;
    each extra bound the prior declares (Prior.extra_bounds) beside it."""
    cfg = run.cfg
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    val = run.tokens.val if not cfg.nll_batches else run.tokens.val[: cfg.nll_batches * cfg.batch_size]
    per_seq, kind, reason, extra = held_out_nll(run.prior, val, cfg.batch_size, run.seed, run.device)
    if per_seq is None:
        unavailable[K.NLL_BITS_PER_TOKEN] = reason or "no tractable likelihood for this sampler"
    else:
        est = S.mean_estimate(per_seq)
        results.update(est.as_results(K.NLL_BITS_PER_TOKEN))
        results.update({K.NLL_STDERR: est.se, K.NLL_KIND: kind, K.NLL_SEQUENCES: len(per_seq)})
    labels = {}
    for name, values in extra.items():
        results.update(S.mean_estimate(values).as_results(bound_key(name)))
        labels[bound_key(name)] = run.prior.extra_bounds.get(name, name)
    results[K.EXTRA_BOUNDS] = labels
    return part(results, unavailable, per_sequence=None if per_seq is None else torch.from_numpy(np.asarray(per_seq)))


def samples_part(run: EvalRun, parts: dict[str, Any]) -> dict[str, Any]:
    """Unconditional samples, timed per batch: batch 0 is the warm-up (speed protocol, ImageBART Fig. 8), which
    is also where a compiled path compiles, so compile time never enters s/img. Each decoded batch goes to the
    feature extractor (FeatureStream) outside the timed spans and the peak-memory window, and only the first
    GRID_SAMPLES images are kept."""
    prior, cfg, device, bs = run.prior, run.cfg, run.device, run.cfg.batch_size
    compile_mode = resolve_compile(cfg.compile, device)
    prior.set_compile(compile_mode)
    memory_reason = D.reset_peak_memory(device)
    stream = FeatureStream(run.sample_features, cfg.feature_batch_size, cfg.num_samples, GRID_SAMPLES)
    sample_tokens, t_gen, t_dec, peaks = None, [], [], []
    for _ in tqdm(range(max(2, math.ceil(cfg.num_samples / bs))), desc=f"sample {prior.name}", unit="batch",
                  leave=False):
        run.check_stop(SAMPLES_PART)
        D.sync(device)
        t0 = time.perf_counter()
        with D.autocast(device, run.precision):
            x = prior.sample(bs, generator=run.generator)
        D.sync(device)
        t1 = time.perf_counter()
        img = run.decode(x)
        D.sync(device)
        t2 = time.perf_counter()
        peaks.append(D.peak_memory_mb(device))
        if sample_tokens is None:  # one tensor for all grids, as the features (FeatureStream)
            sample_tokens = x.new_empty((cfg.num_samples, *x.shape[1:]), device="cpu")
        start = stream.seen
        sample_tokens[start:start + len(x)] = x[:cfg.num_samples - start].cpu()
        t_gen.append(t1 - t0)
        t_dec.append(t2 - t1)
        stream.add(img)
        D.reset_peak_memory(device)  # the window is sampling and decoding: feature extraction is left out
    feats, images = stream.finish()
    peak = None if None in peaks else max(peaks)
    gen_s, dec_s = float(np.mean(t_gen[1:])) / bs, float(np.mean(t_dec[1:])) / bs
    results = {K.SAMPLE_SECONDS_PER_IMAGE: gen_s, K.SAMPLES_PER_SECOND: 1.0 / gen_s,
               K.DECODE_SECONDS_PER_IMAGE: dec_s, K.DECODE_IMAGES_PER_SECOND: 1.0 / dec_s, K.NFE: prior.nfe(),
               K.BATCH_SIZE: bs, K.N_SAMPLES: stream.seen, K.PEAK_MEMORY_MB: None if memory_reason else peak,
               K.TIMED_BATCHES: len(t_gen) - 1, K.WARMUP_SECONDS: t_gen[0], K.COMPILE: compile_mode,
               K.COMPILE_SECONDS: max(0.0, t_gen[0] - gen_s * bs) if compile_mode == "on" else None}
    results.update(efficiency(prior, gen_s, device, bs))
    unavailable = {}
    if results[K.SAMPLE_FLOPS_PER_IMAGE] is None:
        unavailable[K.SAMPLER_PEAK_PERCENT] = f"prior={prior.name} does not count its sampling FLOPs (sample_flops)"
    if memory_reason:
        unavailable[K.PEAK_MEMORY_MB] = memory_reason
    # The generator's state after sampling: completions draw on from it, resumed or not.
    return part(results, unavailable, tokens=sample_tokens, grid_images=images,
                features=feats, generator=run.generator.get_state())


def metrics_part(run: EvalRun, parts: dict[str, Any]) -> dict[str, Any]:
    """The samples' metrics against the reference, and how close their token grids come to training grids."""
    drawn = parts[SAMPLES_PART]
    feats = drawn["features"]
    results, unavailable = sample_metrics(run.ref_feats[FE.FEATURE_POOL], run.ref_stats, feats, run.cfg, run.seed)
    sample_tokens = drawn["tokens"]
    results.update(train_match_metrics(sample_tokens[:match_samples(len(sample_tokens), run.cfg)], run.tokens.train,
                                       run.device))
    return part(results, unavailable, features=feats[FE.FEATURE_POOL].float().cpu())


def completions_part(run: EvalRun, parts: dict[str, Any]) -> dict[str, Any]:
    """Upper-half completion (ImageBART Tab. 3 right) of a seeded random sample of val: the lower half kept."""
    prior, cfg, tokens, bs = run.prior, run.cfg, run.tokens, run.cfg.batch_size
    rows = torch.from_numpy(completion_rows(len(tokens.val), cfg))
    n_comp = len(rows)
    if n_comp < 2:
        return part({K.COMPLETION_FID: None},
                    {K.COMPLETION_FID: f"eval.completion_samples={n_comp}: need at least 2 validation images"},
                    grid=None, completions=torch.zeros(0, tokens.val.shape[1], dtype=torch.long))
    inputs = tokens.val[rows]
    done = []
    for i in tqdm(range(0, n_comp, bs), desc=f"complete {prior.name}", unit="batch", leave=False):
        run.check_stop(COMPLETIONS_PART)
        x = inputs[i:i + bs].to(run.device)
        keep = upper_half_keep_mask(len(x), tokens.grid, run.device)
        with D.autocast(run.device, run.precision):
            done.append(prior.complete(x, keep, generator=run.generator).cpu())
    done = torch.cat(done)
    results: dict[str, Any] = {K.COMPLETION_NFE: prior.completion_nfe(upper_half_keep_mask(1, tokens.grid,
                                                                                           run.device))}
    comp_images = run.decode(done)
    comp_pool = run.features(comp_images)[FE.FEATURE_POOL]
    results.update(fid_with_interval(run.ref_stats, comp_pool.double().numpy(), cfg.bootstrap, run.seed + 4)
                   .as_results(K.COMPLETION_FID))
    results[K.N_COMPLETIONS] = n_comp
    # Grid rows: masked input (upper half grey), completion, original reconstruction.
    k = min(8, n_comp)
    originals = run.decode(inputs[:k])
    masked = originals.clone()
    masked[:, :, : masked.shape[2] // 2] = 128
    return part(results, completions=done, grid=torch.cat([masked, comp_images[:k], originals]))


def fd_part(run: EvalRun, parts: dict[str, Any]) -> dict[str, Any]:
    """The samples' Frechet distances on the extractors of eval.fd_features (none: an empty part)."""
    results, unavailable, features = fd_metrics(run.fds, parts[SAMPLES_PART]["features"], run.cfg, run.seed)
    return part(results, unavailable, features=features)


PART_FUNCTIONS: dict[str, Callable[[EvalRun, dict[str, Any]], dict[str, Any]]] = {
    NLL_PART: nll_part, SAMPLES_PART: samples_part, METRICS_PART: metrics_part, COMPLETIONS_PART: completions_part,
    FD_PART: fd_part}


def write_outputs(parts: dict[str, Any], out_dir: Path) -> None:
    """The evaluation's files: per-sequence NLL, sample features, the two grids, samples and completions."""
    if parts[NLL_PART]["per_sequence"] is not None:
        np.save(out_dir / "nll_per_sequence.npy", parts[NLL_PART]["per_sequence"].numpy())
    np.save(out_dir / "sample_features.npy", parts[METRICS_PART]["features"].numpy().astype(np.float32))
    for name, feats in parts[FD_PART]["features"].items():
        np.save(out_dir / f"sample_features_{name}.npy", feats.numpy().astype(np.float32))
    drawn, comp = parts[SAMPLES_PART], parts[COMPLETIONS_PART]
    if comp["grid"] is not None:
        save_grid(comp["grid"], out_dir / "completion_grid.png", nrow=len(comp["grid"]) // 3)
    save_grid(drawn["grid_images"], out_dir / "samples_grid.png", nrow=8)
    np.savez_compressed(out_dir / "samples.npz", images=drawn["grid_images"].numpy(), tokens=drawn["tokens"].numpy(),
                        completions=comp["completions"].numpy())


def evaluate_prior(prior: Prior, tokens: TokenSet, tokenizer, extractor: FE.FeatureExtractor,
                   ref_feats: dict[str, torch.Tensor], ref_stats: dict[str, np.ndarray], cfg: EvalConfig, seed: int,
                   device: torch.device, out_dir: Path, precision: str = "fp32", work: Path | None = None,
                   check_stop: Callable[[str], None] = lambda part: None, fds: list[FDFeatures] = ()
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every metric the eval stage owns (docs/design.md), plus grids and arrays in out_dir: the parts
    EVAL_PARTS in order, each returning its share of the results.

    precision "bf16" runs sampling and completion under bf16 autocast (as training, so the speed column is
    the one a user gets); the NLL stays in float32, where the exact and bound comparisons are made.

    With `work`, each finished part is kept there, and a rerun after an interruption resumes from the parts it
    finds; `check_stop(part)` is called between batches and parts and raises to stop (preemption), losing only
    the part in flight."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prior.eval()
    run = EvalRun(prior, tokens, tokenizer, extractor, ref_feats, ref_stats, cfg, seed, device, precision,
                  check_stop, torch.Generator(device=device).manual_seed(seed), list(fds))
    parts: dict[str, Any] = {}
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name in EVAL_PARTS:
        check_stop(name)
        parts[name] = resumable_part(work, name, functools.partial(PART_FUNCTIONS[name], run, parts))
        results.update(parts[name][RESULTS])
        unavailable.update(parts[name][K.UNAVAILABLE])
        if name == SAMPLES_PART:  # resumed or not, completions draw on from the state sampling left
            run.generator.set_state(parts[name]["generator"].to(run.generator.get_state().device))
    write_outputs(parts, out_dir)
    results[K.FEATURE_EXTRACTOR] = extractor.name
    return results, unavailable


def read_baselines(d: Path) -> dict[str, Any]:
    return json.loads((d / "baselines.json").read_text())
