"""The evaluation protocol (DESIGN.md section 5), one code path for every prior.

Reference features of the real train split are a cached stage; a job then
computes NLL on the validation tokens, unconditional samples and their metrics,
upper-half completion FID, and sampling speed at batch 50 with a warm-up batch.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from bench import metrics as M
from bench.cache import cached_stage, content_key, read_meta
from bench.data import ImageData
from bench.errors import ConfigError
from bench.tokens import TokenSet, decode_tokens
from bench.train import autocast
from priors.base import Prior

log = logging.getLogger(__name__)


# ---- reference features -------------------------------------------------

def reference_key(data: ImageData, extractor_name: str, num_reference: int | None) -> str:
    return content_key("reference-v1", data.key, extractor_name, num_reference)


def build_reference(data: ImageData, extractor: M.FeatureExtractor, cfg: Any, cache_root: Path
                    ) -> tuple[Path, str]:
    n_ref = cfg.get("num_reference")
    key = reference_key(data, extractor.name, n_ref)

    def build(tmp: Path) -> dict[str, Any]:
        images = data.train if not n_ref else data.train[: int(n_ref)]
        t0 = time.time()
        feats = M.images_to_features(torch.from_numpy(images), extractor,
                                     batch_size=int(cfg.feature_batch_size), progress=True)
        seconds = time.time() - t0
        torch.save({k: v.cpu() for k, v in feats.items()}, tmp / "features.pt")
        stats = M.features_to_statistics(feats["pool"])
        np.savez(tmp / "statistics.npz", **stats)
        return {"extractor": extractor.name, "n": len(images), "seconds": seconds,
                "images_per_second": len(images) / max(seconds, 1e-9)}

    d = cached_stage(cache_root, "reference", key, build, what="reference features")
    return d, key


def load_reference(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    feats = torch.load(d / "features.pt", map_location="cpu", weights_only=True)
    stats = dict(np.load(d / "statistics.npz"))
    return feats, stats


def reconstruction_fid(tokens: TokenSet, ref_dir: Path, ref_key: str, extractor: M.FeatureExtractor,
                       cfg: Any, cache_root: Path) -> dict[str, Any]:
    """rFID of the tokenizer's validation reconstructions against the reference (a small cached stage)."""
    key = content_key("rfid-v1", tokens.key, ref_key)

    def build(tmp: Path) -> dict[str, Any]:
        recon = torch.from_numpy(np.load(tokens.directory / "val_reconstructions.npy"))
        feats = M.images_to_features(recon, extractor, batch_size=int(cfg.feature_batch_size))
        ref_stats = dict(np.load(ref_dir / "statistics.npz"))  # FID needs the statistics, not the features
        fid = M.features_to_fid(ref_stats, feats["pool"])
        return {"recon_fid": fid, "n": len(recon)}

    d = cached_stage(cache_root, "rfid", key, build, what="reconstruction FID")
    return read_meta(d)


# ---- helpers ------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated memory on a GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
                 ) -> tuple[float, float | None, str]:
    """Mean bits per token over the validation tokens, with the standard error of bound estimators."""
    g = torch.Generator(device=device).manual_seed(seed)
    means, errs, sizes, kind = [], [], [], "exact"
    for i in tqdm(range(0, len(val), batch_size), desc="nll", unit="batch", leave=False):
        x = val[i:i + batch_size].to(device)
        r = prior.nll(x, generator=g)
        means.append(r.bits_per_token)
        errs.append(r.stderr)
        sizes.append(len(x))
        kind = r.kind
    n = sum(sizes)
    mean = sum(m * s for m, s in zip(means, sizes)) / n
    if any(e is None for e in errs):
        return mean, None, kind
    # Batches are independent estimates: the stderr of the weighted mean.
    stderr = math.sqrt(sum((s * e) ** 2 for s, e in zip(sizes, errs))) / n
    return mean, stderr, kind


# ---- the evaluation ------------------------------------------------------

def evaluate_prior(prior: Prior, tokens: TokenSet, tokenizer, extractor: M.FeatureExtractor,
                   ref_feats: dict[str, torch.Tensor], ref_stats: dict[str, np.ndarray], cfg: Any, seed: int,
                   device: torch.device, out_dir: Path, precision: str = "fp32"
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every metric of DESIGN.md section 4 that the eval stage owns, plus grids and arrays in out_dir.

    precision "bf16" runs sampling and completion under bf16 autocast (as training, so the speed column is
    the one a user gets); the NLL stays in float32, where the exact and ELBO comparisons are made."""
    n_samples, bs = int(cfg.num_samples), int(cfg.batch_size)
    if n_samples < 2:
        raise ConfigError(f"eval.num_samples={n_samples} must be at least 2")
    prior.eval()
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}

    # NLL on held-out tokens.
    val = tokens.val if not cfg.get("nll_batches") else tokens.val[: int(cfg.nll_batches) * bs]
    nll, stderr, kind = held_out_nll(prior, val, bs, seed, device)
    results.update(nll_bits_per_token=nll, nll_stderr=stderr, nll_kind=kind)

    # Unconditional samples, timed per batch: batch 0 is the warm-up (speed protocol, ImageBART Fig. 8).
    g = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sample_tokens, images, t_gen, t_dec = [], [], [], []
    n_batches = max(2, math.ceil(n_samples / bs))
    for _ in tqdm(range(n_batches), desc=f"sample {prior.name}", unit="batch", leave=False):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            x = prior.sample(bs, generator=g)
        sync(device)
        t1 = time.perf_counter()
        img = decode_tokens(tokenizer, x, tokens.inverse, tokens.grid, batch_size=bs, device=str(device))
        sync(device)
        t2 = time.perf_counter()
        sample_tokens.append(x.cpu())
        images.append(img)
        t_gen.append(t1 - t0)
        t_dec.append(t2 - t1)
    sample_tokens = torch.cat(sample_tokens)[:n_samples]
    images = torch.cat(images)[:n_samples]
    gen_s = float(np.mean(t_gen[1:])) / bs
    dec_s = float(np.mean(t_dec[1:])) / bs
    results.update(sample_seconds_per_image=gen_s, samples_per_second=1.0 / gen_s,
                   decode_seconds_per_image=dec_s, decode_images_per_second=1.0 / dec_s,
                   nfe=prior.nfe(), batch_size=bs, n_samples=len(images),
                   peak_memory_mb=peak_memory_mb(device), timed_batches=len(t_gen) - 1)

    feats = M.images_to_features(images, extractor, batch_size=int(cfg.feature_batch_size))
    values, missing = M.compute_metrics(ref_feats["pool"], feats, real_stats=ref_stats,
                                        prdc_k=int(cfg.prdc_k), prdc_samples=int(cfg.prdc_samples),
                                        kid_subsets=int(cfg.kid_subsets), kid_subset_size=int(cfg.kid_subset_size),
                                        isc_splits=int(cfg.isc_splits), seed=seed)
    results.update(values)
    unavailable.update(missing)

    # Upper-half completion (ImageBART Tab. 3 right): keep the lower half of the token grid.
    n_comp = len(tokens.val) if cfg.get("completion_samples") is None else min(int(cfg.completion_samples),
                                                                                 len(tokens.val))
    if n_comp < 2:
        results["completion_fid"] = None
        unavailable["completion_fid"] = f"eval.completion_samples={n_comp}: need at least 2 validation images"
        completions = torch.zeros(0, tokens.val.shape[1], dtype=torch.long)
    else:
        completions = []
        for i in tqdm(range(0, n_comp, bs), desc=f"complete {prior.name}", unit="batch", leave=False):
            x = tokens.val[i:min(i + bs, n_comp)].to(device)
            keep = upper_half_keep_mask(len(x), tokens.grid, device)
            with autocast(device, precision):
                completions.append(prior.complete(x, keep, generator=g).cpu())
        completions = torch.cat(completions)
        comp_images = decode_tokens(tokenizer, completions, tokens.inverse, tokens.grid, bs, str(device))
        comp_feats = M.images_to_features(comp_images, extractor, batch_size=int(cfg.feature_batch_size))
        results["completion_fid"] = M.features_to_fid(ref_stats, comp_feats["pool"])
        results["completion_samples"] = n_comp
        # Grid rows: masked input (upper half grey), completion, original reconstruction.
        k = min(8, n_comp)
        originals = decode_tokens(tokenizer, tokens.val[:k], tokens.inverse, tokens.grid, bs, str(device))
        masked = originals.clone()
        masked[:, :, : masked.shape[2] // 2] = 128
        save_grid(torch.cat([masked, comp_images[:k], originals]), out_dir / "completion_grid.png", nrow=k)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(images[:64], out_dir / "samples_grid.png", nrow=8)
    np.savez_compressed(out_dir / "samples.npz", images=images.numpy(), tokens=sample_tokens.numpy(),
                        completions=completions.numpy())
    results["feature_extractor"] = extractor.name
    return results, unavailable
