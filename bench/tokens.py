"""Tokenizer and shared token cache stages, for any tokenizer of the registry image_tokenizers.TOKENIZERS.

tokenizer: the tokenizer built once per content key (`Tokenizer.build`: trained here, or the release recorded).
tokens: the train/val images encoded once, remapped to the effective codebook
(ImageBART appendix A.1.1; a tokenizer that `keeps_codebook`, a release's first stage, keeps its ids), with the tokenizer's reconstruction quality. With
`tokenizer.hflip_train` the train images are also encoded mirrored left-right:
twice the priors' training sequences; validation is never mirrored.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bench.cache import cached_stage, content_key, read_meta
from bench.data import ImageData
from bench.errors import ConfigError
from image_tokenizers import Tokenizer, TokensOptions, build_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenSet:
    train: torch.Tensor  # (N_train, L) int64 in [0, K_eff)
    val: torch.Tensor  # (N_val, L) int64 in [0, K_eff)
    vocab_size: int  # K_eff, the vocabulary every prior sees
    grid: tuple[int, int]  # (h, w), L = h * w
    key: str  # tokens cache key
    tokenizer_key: str
    meta: dict[str, Any]
    inverse: torch.Tensor  # (K_eff,) original codebook index of each effective id
    directory: Path
    tokenizer: Tokenizer  # as configured; load_tokenizer makes it encode and decode


def job_tokenizer(cfg: DictConfig) -> tuple[Tokenizer, TokensOptions]:
    """The job's tokenizer (cfg.tokenizer, for images of cfg.data.resolution) and the tokens stage's options; a
    bad option is a one-line ConfigError naming it. Only the configuration is read (see validate_tokenizer)."""
    options = cfg.tokenizer
    options = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options)
    try:
        return build_tokenizer(options, int(cfg.data.resolution))
    except (ValueError, TypeError) as e:
        raise config_error(e) from None


def validate_tokenizer(cfg: DictConfig) -> tuple[Tokenizer, TokensOptions]:
    """job_tokenizer, then the tokenizer's own checks of its files (a release's checkpoint is loaded once)."""
    tokenizer, options = job_tokenizer(cfg)
    try:
        tokenizer.check()
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise config_error(e) from None
    return tokenizer, options


def config_error(e: Exception) -> ConfigError:
    """A tokenizer's error as the job's one-line ConfigError, naming the tokenizer option where it does not."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(msg if msg.startswith(("tokenizer", "release.", "data.")) else f"tokenizer: {msg}")


def tokens_key(tokenizer_key: str, options: TokensOptions) -> str:
    """The tokens stage's key: the tokens are a function of the tokenizer (and so of the data) and of whether
    the train images are also encoded mirrored."""
    return content_key("tokens-v2", tokenizer_key, options.hflip_train)


def load_tokenizer(tok_dir: Path, tokenizer: Tokenizer, device: str = "cpu") -> Tokenizer:
    """`tokenizer` loaded from its finished stage's folder, ready to encode and decode."""
    tokenizer.load(tok_dir, device)
    return tokenizer


def tokenizer_stage(tokenizer: Tokenizer, data: ImageData, cache_root: Path, device: str = "cpu"
                    ) -> tuple[Path, str]:
    """The tokenizer stage's folder and key, built (trained, or the release recorded) when not cached."""
    tokenizer.prepare()  # before the key: what it puts in place can change the key
    key = tokenizer.content_key(data.key)
    work = Path(cache_root) / "tokenizer" / f"{key}.work"  # resumable state of an interrupted build
    d = cached_stage(cache_root, "tokenizer", key,
                     lambda tmp: tokenizer.build(torch.from_numpy(data.train), tmp, work, device), what="tokenizer")
    shutil.rmtree(work, ignore_errors=True)
    return d, key


@torch.inference_mode()
def encode_images(tokenizer: Tokenizer, images: np.ndarray, batch_size: int, desc: str) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> codebook ids (N, L) on the CPU, in batches."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        out.append(tokenizer.encode(images[i:i + batch_size]).flatten(1).cpu())  # (B, L)
    return torch.cat(out).long()


@torch.inference_mode()
def decode_tokens(tokenizer: Tokenizer, tokens: torch.Tensor, inverse: torch.Tensor, grid: tuple[int, int],
                  batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Effective-codebook tokens (N, L) -> uint8 images (N, C, H, W) on the CPU."""
    out = []
    inverse = inverse.to(device)
    for i in range(0, len(tokens), batch_size):
        idx = inverse[tokens[i:i + batch_size].to(device)].view(-1, *grid)  # (B, h, w) original codes
        out.append(tokenizer.decode(idx).cpu())
    return torch.cat(out)


def effective_codebook(train_codes: torch.Tensor, n_embed: int, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageBART appendix A.1.1: drop codes unused on the train split.

    Returns (remap (n_embed,) original -> effective id, inverse (K_eff,) effective -> original).
    Codes never seen in training (they can appear in validation or in new images) map
    to a random used code, as the paper does.
    """
    used = torch.unique(train_codes)  # sorted original ids
    remap = torch.empty(n_embed, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    remap[:] = torch.randint(len(used), (n_embed,), generator=g)
    remap[used] = torch.arange(len(used))
    return remap, used.clone()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR in dB between uint8 image batches."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


def build_tokens(tokenizer: Tokenizer, options: TokensOptions, data: ImageData, cache_root: Path,
                 device: str = "cpu") -> TokenSet:
    tok_dir, tok_key = tokenizer_stage(tokenizer, data, cache_root, device)
    key = tokens_key(tok_key, options)
    d = cached_stage(cache_root, "tokens", key, lambda tmp: encode_dataset(tokenizer, tok_dir, tok_key, options,
                                                                           data, tmp, device), what="tokens")
    meta = read_meta(d)
    blob = torch.load(d / "tokens.pt", map_location="cpu", weights_only=True)
    ts = TokenSet(blob["train"], blob["val"], int(meta["vocab_size"]), tuple(meta["grid"]), key, tok_key,
                  meta, blob["inverse"], d, tokenizer)
    log.info("tokens: K_eff=%d of %d codes (usage %.1f%%, perplexity %.1f), grid %dx%d, val PSNR %.2f dB",
             ts.vocab_size, meta["n_embed"], 100 * meta["codebook_usage"], meta["codebook_perplexity"],
             *ts.grid, meta["recon_psnr"])
    return ts


def encode_dataset(tokenizer: Tokenizer, tok_dir: Path, tok_key: str, options: TokensOptions, data: ImageData,
                   tmp: Path, device: str) -> dict[str, Any]:
    """The tokens stage's work: encode train (and mirrored train) and val, remap to the effective codebook,
    decode val for the reconstruction PSNR; writes tokens.pt and val_reconstructions.npy into tmp."""
    load_tokenizer(tok_dir, tokenizer, device)
    n_embed, batch_size = tokenizer.codebook_size, options.encode_batch_size
    t0 = time.time()
    train_codes = encode_images(tokenizer, data.train, batch_size, "encode train")
    if options.hflip_train:  # (N, C, H, W): mirror the width axis
        train_codes = torch.cat([train_codes, encode_images(tokenizer, np.ascontiguousarray(data.train[..., ::-1]),
                                                            batch_size, "encode train mirrored")])
    val_codes = encode_images(tokenizer, data.val, batch_size, "encode val")
    if tokenizer.keeps_codebook:  # a released prior reads the codebook's own ids
        remap = inverse = torch.arange(n_embed)
    else:
        remap, inverse = effective_codebook(train_codes, n_embed)
    train, val = remap[train_codes], remap[val_codes]
    k_eff = len(inverse)
    counts = torch.bincount(train.flatten(), minlength=k_eff).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    grid = tuple(tokenizer.grid)
    recon = decode_tokens(tokenizer, val, inverse, grid, batch_size, device)
    torch.save({"train": train, "val": val, "remap": remap, "inverse": inverse}, tmp / "tokens.pt")
    np.save(tmp / "val_reconstructions.npy", recon.numpy())
    return {
        "vocab_size": k_eff, "n_embed": n_embed, "grid": list(grid), "tokenizer_key": tok_key,
        "n_train": len(train), "n_val": len(val), "hflip_train": options.hflip_train,
        "recon_psnr": psnr(recon, torch.from_numpy(data.val)),
        "codebook_usage": k_eff / n_embed, "codebook_perplexity": perplexity,
        "encode_seconds": time.time() - t0,
    }
