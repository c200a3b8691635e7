"""The evaluation protocol (DESIGN.md section 5), one code path for every prior.

    reference   Inception features of a seeded random sample of the train split (cached once)
    baselines   real val images and the tokenizer's reconstructions of them, at each column's N (cached once)
    a job       NLL per validation sequence; samples, their metrics with intervals; upper-half
                completion FID on a seeded random sample of val; speed at batch 50 after a warm-up batch;
                how close the samples' token grids come to training grids (train_match, train_copies)

Every FID-type number of a column is computed at the same N against the same reference: sample metrics at
N = eval.num_samples, completion FID at N = eval.completion_samples (clipped to the val split), and PRDC with
equal real and fake counts (the reference subsampled, seeded). Intervals and tests: bench/stats.py.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from bench import device as D
from bench import metrics as M
from bench import stats as S
from bench.cache import atomic_torch_save, atomic_write_json, cached_stage, content_key, move_aside
from bench.data import ImageData
from bench.results import BASELINE_KEYS
from bench.tokens import TokenSet, decode_tokens
from bench.errors import ConfigError
from priors.base import Prior
from priors.flops import matmul_peak_flops, sample_flops_per_image

log = logging.getLogger(__name__)

# Seeds of the protocol's random draws, offset from eval.split_seed: the same draws for every job of a sweep.
REFERENCE_DRAW, VAL_DRAW, COMPLETION_DRAW, PRDC_DRAW = 0, 1, 2, 3


def completion_rows(n_val: int, cfg: Any) -> np.ndarray:
    """The val images every job completes (and the completion baselines use)."""
    return M.sample_rows(n_val, cfg.get("completion_samples"), int(cfg.get("split_seed", 0)) + COMPLETION_DRAW)


# ---- reference features -------------------------------------------------

def reference_key(data_key: str, weights_sha256: str, cfg: Any) -> str:
    """Keyed by the extractor weights' content: two weight files of the same name never share a reference."""
    return content_key("reference-v2", data_key, weights_sha256, cfg.get("num_reference"),
                       int(cfg.get("split_seed", 0)))


def build_reference(data: ImageData, extractor: M.FeatureExtractor, cfg: Any, cache_root: Path
                    ) -> tuple[Path, str]:
    key = reference_key(data.key, extractor.weights_sha256, cfg)

    def build(tmp: Path) -> dict[str, Any]:
        rows = M.sample_rows(len(data.train), cfg.get("num_reference"), int(cfg.get("split_seed", 0)) + REFERENCE_DRAW)
        t0 = time.time()
        feats = M.images_to_features(torch.from_numpy(data.train[rows]), extractor,
                                     batch_size=int(cfg.feature_batch_size), progress=True)
        seconds = time.time() - t0
        torch.save({k: v.cpu() for k, v in feats.items()}, tmp / "features.pt")
        np.save(tmp / "rows.npy", rows)
        np.savez(tmp / "statistics.npz", **M.features_to_statistics(feats["pool"]))
        return {"extractor": extractor.name, "weights_sha256": extractor.weights_sha256, "n": len(rows),
                "n_train": len(data.train), "seconds": seconds, "images_per_second": len(rows) / max(seconds, 1e-9)}

    return cached_stage(cache_root, "reference", key, build, what="reference features"), key


def load_reference(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    feats = torch.load(d / "features.pt", map_location="cpu", weights_only=True)
    return feats, dict(np.load(d / "statistics.npz"))


# ---- metrics with intervals -----------------------------------------------

def fid_with_interval(ref_stats: dict[str, np.ndarray], pool: np.ndarray, resamples: int, seed: int,
                      value: float | None = None) -> S.Estimate:
    """FID (bench.metrics.features_to_fid, tested equal to torch-fidelity; `value` if already computed) with its
    interval from subsampling without replacement (bench.stats.subsample_estimate)."""
    value = M.features_to_fid(ref_stats, pool) if value is None else value
    fid = S.FIDResampler(ref_stats["mu"], ref_stats["sigma"], pool)
    return S.subsample_estimate(value, fid, len(pool), resamples, seed, "fid")


def sample_metrics(ref_pool: torch.Tensor, ref_stats: dict[str, np.ndarray], fake: dict[str, torch.Tensor],
                   cfg: Any, seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """FID, KID, IS, PRDC of one sample set against the reference, each with `<key>_ci` and `<key>_se`.

    Point values come from bench.metrics (torch-fidelity, prdc); PRDC uses as many reference rows as there are
    samples (seeded subsample). Intervals, the reference fixed (bench.stats): FID from eval.bootstrap subsets of
    the samples drawn without replacement at two sizes; KID from its U-statistic variance; PRDC from subsets at
    two sizes; IS from eval.bootstrap resamples."""
    n = len(fake[M.FEATURE_POOL])
    resamples = int(cfg.bootstrap)
    real_prdc = M.subsample_rows(ref_pool.double().numpy(), n, int(cfg.get("split_seed", 0)) + PRDC_DRAW)
    resamplers: dict[str, Any] = {}
    values, missing = M.compute_metrics(ref_pool, fake, real_stats=ref_stats, real_prdc=torch.from_numpy(real_prdc),
                                        prdc_k=int(cfg.prdc_k), prdc_samples=int(cfg.prdc_samples),
                                        isc_splits=int(cfg.isc_splits), seed=seed, resamplers=resamplers)
    out: dict[str, Any] = dict(values)
    pool = fake[M.FEATURE_POOL].double().numpy()
    if values.get("fid") is not None:
        out.update(fid_with_interval(ref_stats, pool, resamples, seed, value=values["fid"]).as_results("fid"))
    if values.get("kid_mean") is not None:
        kid = resamplers["kid"]
        out.update(kid.estimate().as_results("kid_mean"))
    if values.get("prdc_precision") is not None:
        for name, est in S.prdc_estimates(real_prdc, pool, int(cfg.prdc_k), values, resamples, seed + 2).items():
            out.update(est.as_results(name))
    if values.get("is_mean") is not None:
        logits = fake[M.FEATURE_LOGITS].double().numpy()
        isc = S.ISResampler(logits, min(int(cfg.isc_splits), n), seed + 2020)  # logits_to_isc's splits and seed
        out.update(S.bootstrap_estimate(values["is_mean"], S.bootstrap(isc, n, resamples, seed + 3), "is_mean")
                   .as_results("is_mean"))
    out["n_bootstrap"] = resamples
    return out, missing


# ---- closeness to the training set ----------------------------------------

def train_match(samples: torch.Tensor, train: torch.Tensor, device: torch.device | str = "cpu",
                max_cells: int = 2 ** 26) -> np.ndarray:
    """Per sample token grid (N, L): the largest share of its L positions that hold the same code as one training
    grid (M, L), i.e. 1 - the normalised Hamming distance to its nearest training grid; 1.0 is an exact copy.
    Exact over all M training grids, in chunks of at most `max_cells` compared tokens."""
    if samples.ndim != 2 or train.ndim != 2 or samples.shape[1] != train.shape[1]:
        raise ValueError(f"token grids of different lengths: samples {tuple(samples.shape)}, "
                         f"train {tuple(train.shape)}")
    n, L = samples.shape
    train = train.to(device)
    rows = max(1, max_cells // max(1, len(train) * L))
    best = torch.empty(n, dtype=torch.long)
    for i in range(0, n, rows):
        s = samples[i:i + rows].to(device)
        best[i:i + rows] = (s[:, None, :] == train[None, :, :]).sum(-1).amax(1).cpu()
    return best.double().numpy() / L


def match_samples(n: int, cfg: Any) -> int:
    """How many of n sample grids are searched against the training set (eval.match_samples; null: all)."""
    cap = cfg.get("match_samples")
    return n if cap is None else min(n, int(cap))


def train_match_metrics(samples: torch.Tensor, train: torch.Tensor, device: torch.device | str = "cpu"
                        ) -> dict[str, Any]:
    """`train_match` (mean nearest-training-grid token agreement) and `train_copies` (share of samples that are
    an exact training grid), each with a 95% interval over the samples. Against a reference drawn from the train
    split, FID rewards copying: these say how much of a prior's sample quality is recall of its training set."""
    m = train_match(samples, train, device)
    mean = S.mean_estimate(m)
    out = S.bounded_estimate(mean.value, mean.se, "train_match").as_results("train_match")
    copies = (m == 1.0).astype(np.float64)
    p, n = float(copies.mean()), len(copies)
    se = max(S.mean_estimate(copies).se or 0.0, S.binomial_se(p, n))  # a share: never below the binomial floor
    out.update(S.bounded_estimate(p, se, "train_copies").as_results("train_copies"))
    out["n_match_samples"] = n
    return out


# ---- baselines ------------------------------------------------------------

def build_baselines(key: str, data: ImageData, tokens: TokenSet, ref_dir: Path, extractor: M.FeatureExtractor,
                    cfg: Any, cache_root: Path) -> Path:
    """Two baseline rows at each column's N: real val images (the best a prior can reach at that N) and the
    tokenizer's reconstructions of the same images (what a perfect prior over these tokens would reach)."""

    def build(tmp: Path) -> dict[str, Any]:
        ref_feats, ref_stats = load_reference(ref_dir)
        recon_all = np.load(tokens.directory / "val_reconstructions.npy")
        n_val, n_s = len(data.val), int(cfg.num_samples)
        comp = completion_rows(n_val, cfg)
        rows = {"real_val": data.val, "reconstruction": recon_all}
        out: dict[str, Any] = {"n_samples": n_s, "n_completions": len(comp), "n_val": n_val, "unavailable": {}}
        seed = int(cfg.get("split_seed", 0))
        sample_idx = M.sample_rows(n_val, n_s, seed + VAL_DRAW) if n_s <= n_val else None
        match: dict[str, Any] = {}
        if sample_idx is None:
            reason = f"the val split has {n_val} images, fewer than eval.num_samples={n_s}"
            for k in BASELINE_KEYS:
                if k != "completion_fid":  # at its own N, below
                    out["unavailable"][k] = reason
        else:
            # Both rows' token grids are the val images' codes (the reconstructions decode the same codes).
            match = train_match_metrics(tokens.val[torch.from_numpy(sample_idx[:match_samples(n_s, cfg)])],
                                        tokens.train)
        for name, images in rows.items():
            row: dict[str, Any] = {}
            if sample_idx is not None:
                feats = M.images_to_features(torch.from_numpy(images[sample_idx]), extractor,
                                             batch_size=int(cfg.feature_batch_size), progress=True)
                values, missing = sample_metrics(ref_feats["pool"], ref_stats, feats, cfg, seed)
                row.update(values)
                out["unavailable"].update(missing)
                row.update(match)
            if len(comp) >= 2:
                pool = M.images_to_features(torch.from_numpy(images[comp]), extractor,
                                            batch_size=int(cfg.feature_batch_size))["pool"].double().numpy()
                row.update(fid_with_interval(ref_stats, pool, int(cfg.bootstrap), seed).as_results("completion_fid"))
            out[name] = row
        atomic_write_json(tmp / "baselines.json", out)
        return {"n_samples": n_s, "n_completions": len(comp)}

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

COMPILE_MODES = ("auto", "off", "on")


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


def efficiency(prior: Prior, seconds_per_image: float, device: torch.device) -> dict[str, float | None]:
    """Model FLOPs per image of sample() (counted from the architecture), the FLOP/s achieved, and that as a
    share of the device's measured matmul peak."""
    flops = sample_flops_per_image(prior)
    peak = device_peak_flops(str(device), torch.get_num_threads())
    achieved = None if flops is None else flops / seconds_per_image
    return {"sample_flops_per_image": flops, "achieved_flops": achieved, "peak_flops": peak,
            "sampler_peak_percent": None if achieved is None else 100 * achieved / peak}


# ---- the evaluation ------------------------------------------------------

EVAL_PARTS = ("nll", "samples", "metrics", "completions")  # the evaluation's resumable parts, in order


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
            data["results"], data["unavailable"] = json.loads(data["results"]), json.loads(data["unavailable"])
            log.info("eval: %s resumed from %s", name, path)
            return data
        except Exception as e:  # noqa: BLE001 - a damaged part is recomputed, whatever torch raises
            aside = move_aside(path)
            log.warning("eval: %s cannot be read (%s); moved aside to %s, computing %s again", path,
                        type(e).__name__, aside, name)
    data = compute()
    if path is not None:
        atomic_torch_save({**data, "results": json.dumps(data["results"], default=_plain),
                           "unavailable": json.dumps(data["unavailable"], default=_plain)}, path)
    return data


def evaluate_prior(prior: Prior, tokens: TokenSet, tokenizer, extractor: M.FeatureExtractor,
                   ref_feats: dict[str, torch.Tensor], ref_stats: dict[str, np.ndarray], cfg: Any, seed: int,
                   device: torch.device, out_dir: Path, precision: str = "fp32", work: Path | None = None,
                   check_stop: Callable[[str], None] = lambda part: None
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every metric of DESIGN.md section 4 that the eval stage owns, plus grids and arrays in out_dir.

    precision "bf16" runs sampling and completion under bf16 autocast (as training, so the speed column is
    the one a user gets); the NLL stays in float32, where the exact and bound comparisons are made.

    With `work`, each finished part (EVAL_PARTS) is kept there, and a rerun after an interruption resumes from
    the parts it finds; `check_stop(part)` is called between batches and parts and raises to stop (preemption),
    losing only the part in flight."""
    n_samples, bs = int(cfg.num_samples), int(cfg.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    prior.eval()
    g = torch.Generator(device=device).manual_seed(seed)  # samples, then completions

    def nll() -> dict[str, Any]:
        # NLL on held-out tokens: per sequence, so every prior's stderr means the same and pairs can be compared.
        results: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        val = tokens.val if not cfg.get("nll_batches") else tokens.val[: int(cfg.nll_batches) * bs]
        per_seq, kind, reason, extra = held_out_nll(prior, val, bs, seed, device)
        if per_seq is None:
            unavailable["nll_bits_per_token"] = reason or "no tractable likelihood for this sampler"
        else:
            est = S.mean_estimate(per_seq)
            results.update(est.as_results("nll_bits_per_token"), nll_stderr=est.se, nll_kind=kind,
                           nll_sequences=len(per_seq))
        if "elbo_eq6" in extra:
            results.update(S.mean_estimate(extra["elbo_eq6"]).as_results("elbo_eq6_bits_per_token"))
        return {"results": results, "unavailable": unavailable,
                "per_sequence": None if per_seq is None else torch.from_numpy(np.asarray(per_seq))}

    def samples() -> dict[str, Any]:
        # Unconditional samples, timed per batch: batch 0 is the warm-up (speed protocol, ImageBART Fig. 8), which
        # is also where a compiled path compiles: compile time never enters s/img.
        results: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        compile_mode = resolve_compile(cfg.get("compile", "auto"), device)
        prior.set_compile(compile_mode)
        memory_reason = D.reset_peak_memory(device)
        sample_tokens, images, t_gen, t_dec = [], [], [], []
        n_batches = max(2, math.ceil(n_samples / bs))
        for _ in tqdm(range(n_batches), desc=f"sample {prior.name}", unit="batch", leave=False):
            check_stop("samples")
            D.sync(device)
            t0 = time.perf_counter()
            with D.autocast(device, precision):
                x = prior.sample(bs, generator=g)
            D.sync(device)
            t1 = time.perf_counter()
            img = decode_tokens(tokenizer, x, tokens.inverse, tokens.grid, batch_size=bs, device=str(device))
            D.sync(device)
            t2 = time.perf_counter()
            sample_tokens.append(x.cpu())
            images.append(img)
            t_gen.append(t1 - t0)
            t_dec.append(t2 - t1)
        peak = D.peak_memory_mb(device)
        sample_tokens = torch.cat(sample_tokens)[:n_samples]
        images = torch.cat(images)[:n_samples]
        gen_s = float(np.mean(t_gen[1:])) / bs
        dec_s = float(np.mean(t_dec[1:])) / bs
        results.update(sample_seconds_per_image=gen_s, samples_per_second=1.0 / gen_s,
                       decode_seconds_per_image=dec_s, decode_images_per_second=1.0 / dec_s,
                       nfe=prior.nfe(), batch_size=bs, n_samples=len(images),
                       peak_memory_mb=None if memory_reason else peak, timed_batches=len(t_gen) - 1,
                       warmup_seconds=t_gen[0], compile=compile_mode,
                       compile_seconds=max(0.0, t_gen[0] - gen_s * bs) if compile_mode == "on" else None)
        results.update(efficiency(prior, gen_s, device))
        if results["sample_flops_per_image"] is None:
            unavailable["sampler_peak_percent"] = (f"prior={prior.name} does not count its sampling FLOPs "
                                                   "(sample_flops)")
        if memory_reason:
            unavailable["peak_memory_mb"] = memory_reason
        # The generator's state after sampling: completions draw on from it, resumed or not.
        return {"results": results, "unavailable": unavailable, "tokens": sample_tokens, "images": images,
                "generator": g.get_state()}

    def metrics() -> dict[str, Any]:
        feats = M.images_to_features(drawn["images"], extractor, batch_size=int(cfg.feature_batch_size))
        results, unavailable = sample_metrics(ref_feats["pool"], ref_stats, feats, cfg, seed)
        sample_tokens = drawn["tokens"]
        results.update(train_match_metrics(sample_tokens[:match_samples(len(sample_tokens), cfg)], tokens.train,
                                           device))
        return {"results": results, "unavailable": unavailable,
                "features": feats[M.FEATURE_POOL].float().cpu()}

    def completions() -> dict[str, Any]:
        # Upper-half completion (ImageBART Tab. 3 right) of a seeded random sample of val: keep the lower half.
        results: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        rows = torch.from_numpy(completion_rows(len(tokens.val), cfg))
        n_comp = len(rows)
        if n_comp < 2:
            results["completion_fid"] = None
            unavailable["completion_fid"] = f"eval.completion_samples={n_comp}: need at least 2 validation images"
            return {"results": results, "unavailable": unavailable, "grid": None,
                    "completions": torch.zeros(0, tokens.val.shape[1], dtype=torch.long)}
        inputs = tokens.val[rows]
        done = []
        for i in tqdm(range(0, n_comp, bs), desc=f"complete {prior.name}", unit="batch", leave=False):
            check_stop("completions")
            x = inputs[i:i + bs].to(device)
            keep = upper_half_keep_mask(len(x), tokens.grid, device)
            with D.autocast(device, precision):
                done.append(prior.complete(x, keep, generator=g).cpu())
        done = torch.cat(done)
        results["completion_nfe"] = prior.completion_nfe(upper_half_keep_mask(1, tokens.grid, device))
        comp_images = decode_tokens(tokenizer, done, tokens.inverse, tokens.grid, bs, str(device))
        comp_pool = M.images_to_features(comp_images, extractor, batch_size=int(cfg.feature_batch_size))["pool"]
        results.update(fid_with_interval(ref_stats, comp_pool.double().numpy(), int(cfg.bootstrap), seed + 4)
                       .as_results("completion_fid"))
        results["n_completions"] = n_comp
        # Grid rows: masked input (upper half grey), completion, original reconstruction.
        k = min(8, n_comp)
        originals = decode_tokens(tokenizer, inputs[:k], tokens.inverse, tokens.grid, bs, str(device))
        masked = originals.clone()
        masked[:, :, : masked.shape[2] // 2] = 128
        return {"results": results, "unavailable": unavailable, "completions": done,
                "grid": torch.cat([masked, comp_images[:k], originals])}

    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    parts = {}
    for name, compute in zip(EVAL_PARTS, (nll, samples, metrics, completions)):
        check_stop(name)
        parts[name] = resumable_part(work, name, compute)
        results.update(parts[name]["results"])
        unavailable.update(parts[name]["unavailable"])
        if name == "samples":
            drawn = parts["samples"]
            g.set_state(drawn["generator"].to(g.get_state().device))

    if parts["nll"]["per_sequence"] is not None:
        np.save(out_dir / "nll_per_sequence.npy", parts["nll"]["per_sequence"].numpy())
    np.save(out_dir / "sample_features.npy", parts["metrics"]["features"].numpy().astype(np.float32))
    images = drawn["images"]
    if parts["completions"]["grid"] is not None:
        save_grid(parts["completions"]["grid"], out_dir / "completion_grid.png",
                  nrow=len(parts["completions"]["grid"]) // 3)
    save_grid(images[:64], out_dir / "samples_grid.png", nrow=8)
    np.savez_compressed(out_dir / "samples.npz", images=images.numpy(), tokens=drawn["tokens"].numpy(),
                        completions=parts["completions"]["completions"].numpy())
    results["feature_extractor"] = extractor.name
    return results, unavailable


def read_baselines(d: Path) -> dict[str, Any]:
    return json.loads((d / "baselines.json").read_text())
