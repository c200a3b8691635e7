"""Tokenizer and shared token cache stages.

tokenizer: a VQGAN trained here (`tokenizer=vqgan_tiny`) or a released
taming-transformers checkpoint (`tokenizer=taming`).
tokens: the train/val images encoded once, remapped to the effective codebook
(ImageBART appendix A.1.1), with the tokenizer's reconstruction quality. With
`tokenizer.hflip_train` the train images are also encoded mirrored left-right:
twice the priors' training sequences; validation is never mirrored.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from bench.cache import atomic_torch_save, cached_stage, content_key, read_meta
from bench.data import ImageData
from bench.errors import ConfigError
from bench.vqgan import images_to_unit, unit_to_images
from priors.options import options_from

log = logging.getLogger(__name__)

TOKENIZER_KINDS = ("vqgan", "taming")
TOKENS_ONLY_OPTIONS = ("hflip_train",)  # options of the tokens stage alone: they never retrain the tokenizer


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


def vqgan_configs(cfg: Any) -> tuple[Any, Any]:
    """(VQGANConfig, VQGANTrainConfig) of tokenizer=vqgan from its `model:` and `train:` blocks; an unknown option,
    a value of the wrong type or out of range is a one-line ConfigError naming it."""
    from bench.vqgan import VQGANConfig
    from bench.vqgan_train import VQGANTrainConfig

    out = []
    for cls, block in ((VQGANConfig, "model"), (VQGANTrainConfig, "train")):
        options = cfg.get(block)
        if options is not None and not isinstance(options, dict):
            options = OmegaConf.to_container(options, resolve=True)
        try:
            out.append(options_from(cls, options, f"tokenizer.{block}", owner=str(cfg.kind), group="tokenizer"))
        except (ValueError, TypeError) as e:  # TypeError: a required field is missing
            msg = str(e).splitlines()[0]
            raise ConfigError(msg if msg.startswith("tokenizer.") else f"tokenizer.{block}: {msg}") from None
    return out[0], out[1]


def hflip_train(cfg: Any) -> bool:
    value = cfg.get("hflip_train", False)
    if not isinstance(value, bool):
        raise ConfigError(f"tokenizer.hflip_train={value} must be true or false")
    return value


def validate_tokenizer(cfg: Any) -> None:
    kind = cfg.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"tokenizer.kind={kind} is not one of: {', '.join(TOKENIZER_KINDS)}")
    hflip_train(cfg)
    if kind == "vqgan":
        vqgan_configs(cfg)
    if kind == "taming":
        for opt in ("ckpt", "config"):
            value = cfg.get(opt)
            if value in (None, "", "???"):
                raise ConfigError(f"tokenizer.{opt} is required for tokenizer=taming")
            if not Path(str(value)).expanduser().is_file():
                raise ConfigError(f"tokenizer.{opt}={value}: file not found")
        from bench.vqgan import load_taming_vqgan

        # Loading is the only way to know the checkpoint matches its config; it is cheap next to encoding.
        try:
            load_taming_vqgan(str(Path(str(cfg.ckpt)).expanduser()), str(Path(str(cfg.config)).expanduser()))
        except ConfigError:
            raise
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(msg if msg.startswith("tokenizer.") else f"tokenizer.ckpt={cfg.ckpt}: {msg}") from None


def tokenizer_key(cfg: Any, data_key: str) -> str:
    if cfg.kind == "taming":
        ckpt, conf = (Path(str(cfg.ckpt)).expanduser().resolve(), Path(str(cfg.config)).expanduser().resolve())
        st = ckpt.stat()
        # Path, size and mtime stand in for the content of a multi-GB checkpoint.
        return content_key("tokenizer-taming-v1", data_key, str(ckpt), st.st_size, st.st_mtime_ns,
                           conf.read_text())
    from bench.vqgan_train import lpips_available

    # Whether LPIPS can run changes the trained weights, so it is part of the key.
    lpips_on = float(cfg.train.get("perceptual_weight", 0.0)) > 0 and lpips_available()
    options = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in TOKENS_ONLY_OPTIONS}
    # Where LPIPS's weights come from is not what they are (lpips_on and the file's fixed hash are).
    if isinstance(options.get("train"), dict):
        options["train"] = {k: v for k, v in options["train"].items() if k != "vgg16_weights"}
    return content_key("tokenizer-vqgan-v1", data_key, options, lpips_on)


def tokens_key(tokenizer_key: str, cfg: Any) -> str:
    """The tokens stage's key: the tokens are a function of the tokenizer (and so of the data) and of whether
    the train images are also encoded mirrored."""
    return content_key("tokens-v2", tokenizer_key, hflip_train(cfg))


def load_tokenizer(tok_dir: Path, cfg: Any, device: str = "cpu"):
    """The tokenizer model of a finished tokenizer stage, in eval mode."""
    from bench.vqgan import VQGANConfig, VQModel, load_taming_vqgan

    if cfg.kind == "taming":
        model = load_taming_vqgan(str(Path(str(cfg.ckpt)).expanduser()), str(Path(str(cfg.config)).expanduser()))
    else:
        ckpt = torch.load(tok_dir / "model.pt", map_location="cpu", weights_only=True)
        model = VQModel(VQGANConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in ckpt["config"].items()}))
        model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def build_tokenizer(cfg: Any, data: ImageData, cache_root: Path, device: str = "cpu") -> tuple[Path, str]:
    if cfg.kind != "taming" and float(cfg.train.get("perceptual_weight", 0.0)) > 0:
        from bench.vqgan_train import provide_vgg16

        provide_vgg16(cfg.train.get("vgg16_weights"))  # before the key: it says whether LPIPS is on
    key = tokenizer_key(cfg, data.key)

    def build(tmp: Path) -> dict[str, Any]:
        if cfg.kind == "taming":
            # Nothing to train: the stage records which checkpoint the key stands for.
            return {"kind": "taming", "ckpt": str(cfg.ckpt), "config": str(cfg.config)}
        from bench.vqgan import VQModel
        from bench.vqgan_train import train_vqgan

        model_cfg, train_cfg = vqgan_configs(cfg)
        if model_cfg.resolution != data.train.shape[-1]:
            raise ConfigError(f"tokenizer.model.resolution={model_cfg.resolution} does not match "
                              f"data.resolution={data.train.shape[-1]}")
        torch.manual_seed(train_cfg.seed)
        model = VQModel(model_cfg)
        log.info("tokenizer: training a VQGAN (%.2fM parameters) for %d steps on %d images",
                 sum(p.numel() for p in model.parameters()) / 1e6, train_cfg.steps, len(data.train))
        if train_cfg.perceptual_weight > 0:
            from bench.vqgan_train import lpips_available, vgg16_weights_path

            log.info("tokenizer: LPIPS perceptual term %s", "on" if lpips_available() else
                     f"off: its VGG16 weights are not at {vgg16_weights_path()} "
                     f"(tokenizer.train.vgg16_weights=download fetches them)")
        else:
            log.info("tokenizer: LPIPS perceptual term off (tokenizer.train.perceptual_weight=0)")
        t0 = time.time()
        stats = train_vqgan(model, torch.from_numpy(data.train), train_cfg, device=device)
        seconds = time.time() - t0
        atomic_torch_save({"config": asdict(model_cfg), "state_dict": {k: v.cpu() for k, v in
                                                                        model.state_dict().items()}},
                          tmp / "model.pt")
        return {"kind": "vqgan", "train_seconds": seconds, "train_stats": stats}

    d = cached_stage(cache_root, "tokenizer", key, build, what="tokenizer")
    return d, key


@torch.inference_mode()
def encode_images(model, images: np.ndarray, batch_size: int, device: str, desc: str) -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        x = images_to_unit(images[i:i + batch_size]).to(device)
        out.append(model.encode_to_indices(x).flatten(1).cpu())  # (B, L)
    return torch.cat(out).long()


@torch.inference_mode()
def decode_tokens(model, tokens: torch.Tensor, inverse: torch.Tensor, grid: tuple[int, int],
                  batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Effective-codebook tokens (N, L) -> uint8 images (N, 3, H, W)."""
    out = []
    inverse = inverse.to(device)
    for i in range(0, len(tokens), batch_size):
        idx = inverse[tokens[i:i + batch_size].to(device)].view(-1, *grid)  # (B, h, w) original codes
        out.append(unit_to_images(model.decode_indices(idx)).cpu())
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


def build_tokens(cfg: Any, data: ImageData, cache_root: Path, device: str = "cpu") -> TokenSet:
    tok_dir, tok_key = build_tokenizer(cfg, data, cache_root, device)
    key = tokens_key(tok_key, cfg)
    batch_size = int(cfg.get("encode_batch_size", 64))
    mirrored = hflip_train(cfg)

    def build(tmp: Path) -> dict[str, Any]:
        model = load_tokenizer(tok_dir, cfg, device)
        n_embed = model.cfg.n_embed
        t0 = time.time()
        train_codes = encode_images(model, data.train, batch_size, device, "encode train")
        if mirrored:  # (N, C, H, W): mirror the width axis
            train_codes = torch.cat([train_codes, encode_images(model, np.ascontiguousarray(data.train[..., ::-1]),
                                                                batch_size, device, "encode train mirrored")])
        val_codes = encode_images(model, data.val, batch_size, device, "encode val")
        remap, inverse = effective_codebook(train_codes, n_embed)
        train, val = remap[train_codes], remap[val_codes]
        k_eff = len(inverse)
        counts = torch.bincount(train.flatten(), minlength=k_eff).double()
        p = counts / counts.sum()
        perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        grid = tuple(model.grid)
        recon = decode_tokens(model, val, inverse, grid, batch_size, device)
        torch.save({"train": train, "val": val, "remap": remap, "inverse": inverse}, tmp / "tokens.pt")
        np.save(tmp / "val_reconstructions.npy", recon.numpy())
        return {
            "vocab_size": k_eff, "n_embed": n_embed, "grid": list(grid), "tokenizer_key": tok_key,
            "n_train": len(train), "n_val": len(val), "hflip_train": mirrored,
            "recon_psnr": psnr(recon, torch.from_numpy(data.val)),
            "codebook_usage": k_eff / n_embed, "codebook_perplexity": perplexity,
            "encode_seconds": time.time() - t0,
        }

    d = cached_stage(cache_root, "tokens", key, build, what="tokens")
    meta = read_meta(d)
    blob = torch.load(d / "tokens.pt", map_location="cpu", weights_only=True)
    ts = TokenSet(blob["train"], blob["val"], int(meta["vocab_size"]), tuple(meta["grid"]), key, tok_key,
                  meta, blob["inverse"], d)
    log.info("tokens: K_eff=%d of %d codes (usage %.1f%%, perplexity %.1f), grid %dx%d, val PSNR %.2f dB",
             ts.vocab_size, meta["n_embed"], 100 * meta["codebook_usage"], meta["codebook_perplexity"],
             *ts.grid, meta["recon_psnr"])
    return ts
