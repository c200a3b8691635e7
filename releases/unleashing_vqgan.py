"""The VQGAN of Unleashing Transformers (Bond-Taylor et al., ECCV 2022), in its own layout.

It is taming's VQGAN rearranged: no quant_conv / post_quant_conv (the encoder ends in emb_dim channels, the
generator starts from them), the encoder and the generator are flat `blocks` lists (convolution, residual and
attention blocks, resamplers, the final GroupNorm and convolution, in their order of use), every residual block
owns a 1x1 `conv_out` that it applies only when its width changes, and the generator carries a `logsigma` head
that only the authors' likelihood fine-tuning uses. Module names follow that layout, so the `ae.*` weights of a
released `vqgan_ema_<step>.th` (with `ae.` stripped) load with strict key checking.

Its images are in [0, 1] (the authors' data pipeline ends in ToTensor, without normalisation); encode_to_indices
and decode_indices take and give the project's [-1, 1] and convert at the edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UnleashingVQGANConfig:
    """The VQGAN's sizes under the authors' hyperparameter names (hparams/defaults/vqgan_defaults.py)."""
    n_channels: int
    nf: int
    emb_dim: int
    codebook_size: int
    ch_mult: tuple[int, ...]
    res_blocks: int
    img_size: int
    attn_resolutions: tuple[int, ...]

    @property
    def latent_side(self) -> int:
        return self.img_size // 2 ** (len(self.ch_mult) - 1)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice; the 1x1 `conv_out` shortcut exists always, applied when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_out = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))  # (B, C_out, H, W)
        return h + (self.conv_out(x) if self.c_in != self.c_out else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convolutions for q, k, v and the output."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(b, c, hh * ww)  # (B, C, HW)
        v = self.v(h).reshape(b, c, hh * ww)  # (B, C, HW)
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # (B, HW_q, HW_k)
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding the right and bottom edges by one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(channels: int) -> list[nn.Module]:
    """The non-local stage both halves share: residual, attention, residual."""
    return [ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels)]


class Encoder(nn.Module):
    """[0, 1] images (B, n_channels, S, S) -> latents (B, emb_dim, S / f, S / f), f = 2^(levels - 1)."""

    def __init__(self, cfg: UnleashingVQGANConfig):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(cfg.n_channels, cfg.nf, 3, padding=1)]
        res, c = cfg.img_size, cfg.nf
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(c, cfg.nf * mult))
                c = cfg.nf * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(c))
            if i != len(cfg.ch_mult) - 1:
                blocks.append(Downsample(c))
                res //= 2
        blocks += middle(c) + [group_norm(c), nn.Conv2d(c, cfg.emb_dim, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Generator(nn.Module):
    """Quantised latents (B, emb_dim, s, s) -> [0, 1] images (B, n_channels, S, S); `logsigma` is unused here."""

    def __init__(self, cfg: UnleashingVQGANConfig):
        super().__init__()
        c = cfg.nf * cfg.ch_mult[-1]
        res = cfg.latent_side
        blocks: list[nn.Module] = [nn.Conv2d(cfg.emb_dim, c, 3, padding=1)] + middle(c)
        for i in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(c, cfg.nf * cfg.ch_mult[i]))
                c = cfg.nf * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(c))
            if i != 0:
                blocks.append(Upsample(c))
                res *= 2
        blocks += [group_norm(c), nn.Conv2d(c, cfg.n_channels, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        # a per-pixel scale head the authors fine-tune for their ELBO experiment; part of every released file
        self.logsigma = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, cfg.n_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Codebook(nn.Module):
    """The nearest-neighbour quantiser's codebook (`quantize.embedding.weight`, (codebook_size, emb_dim))."""

    def __init__(self, cfg: UnleashingVQGANConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.emb_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> index of the nearest code (squared Euclidean distance) (B, h, w)."""
        b, d, h, w = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B h w, D)
        e = self.embedding.weight  # (K, D)
        dist = (rows ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * rows @ e.t()  # (B h w, K)
        return dist.argmin(1).view(b, h, w)


class UnleashingVQGAN(nn.Module):
    """The released autoencoder (the `ae` part of a vqgan checkpoint) with the project's tokenizer interface."""

    def __init__(self, cfg: UnleashingVQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = (cfg.latent_side, cfg.latent_side)
        self.encoder = Encoder(cfg)
        self.quantize = Codebook(cfg)
        self.generator = Generator(cfg)

    @property
    def vocab_size(self) -> int:
        return self.cfg.codebook_size

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x float (B, 3, H, W) in [-1, 1] -> LongTensor (B, h, w)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.n_channels or not x.is_floating_point():
            raise ValueError(f"encode_to_indices expects float (B, {self.cfg.n_channels}, H, W) in [-1, 1], "
                             f"got {x.dtype} {tuple(x.shape)}")
        return self.quantize.nearest(self.encoder((x + 1) / 2))

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, h, w) -> float (B, 3, H, W) in about [-1, 1]."""
        if idx.ndim != 3 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"decode_indices expects integer (B, h, w), got {idx.dtype} {tuple(idx.shape)}")
        z_q = self.quantize.embedding(idx.long()).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.generator(z_q.contiguous()) * 2 - 1


def autoencoder_keys(cfg: UnleashingVQGANConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the autoencoder's state dict, in module order (built on the meta device)."""
    with torch.device("meta"):
        model = UnleashingVQGAN(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
