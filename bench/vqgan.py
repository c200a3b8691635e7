"""The VQGAN tokenizer: taming-transformers' `VQModel` (Esser et al., CVPR 2021).

A clean re-implementation of `taming/models/vqgan.py`,
`taming/modules/diffusionmodules/model.py` (Encoder, Decoder) and
`taming/modules/vqvae/quantize.py` (VectorQuantizer2). Module names, and so
state-dict keys and shapes, are taming's, so a released taming checkpoint loads
with `load_taming_vqgan`, and the forward pass runs the same ops in the same
order (swish as x*sigmoid(x), GroupNorm(32, eps=1e-6), the asymmetric
pad-then-stride-2 downsampling, the bmm attention, the squared-distance argmin
of the quantizer) so tokens match taming's bit for bit on the same device.

Shapes: B batch, C channels, H x W pixels, h x w = grid of tokens (L = h*w),
K = n_embed codebook entries, D = embed_dim.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn


@dataclass
class VQGANConfig:
    """taming's `ddconfig` plus `n_embed` and `embed_dim` (model.params of a taming project.yaml)."""
    resolution: int  # training image side in pixels; with ch_mult it fixes where attention blocks sit
    ch: int  # base channel width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...]  # per-level width multipliers; len(ch_mult) - 1 stride-2 downsamplings
    num_res_blocks: int  # ResnetBlocks per encoder level (the decoder uses one more per level)
    attn_resolutions: tuple[int, ...]  # feature-map sides (pixels) at which an AttnBlock follows each ResnetBlock
    z_channels: int  # channels of the encoder output / decoder input
    embed_dim: int  # D: codebook vector size (quant_conv maps z_channels -> embed_dim)
    n_embed: int  # K: number of codebook entries
    in_channels: int = 3  # image channels in
    out_ch: int = 3  # image channels out
    dropout: float = 0.0  # dropout inside ResnetBlocks (taming's VQGANs use 0)
    double_z: bool = False  # taming's KL-autoencoder switch; a VQModel needs False
    remap: str | None = None  # taming's `remap`: .npy of the used codebook ids; indices are then positions in it
    unknown_index: str | int = "random"  # with remap: id for codes outside it ("random", "extra" or an int)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.double_z:
            raise ValueError("double_z=True is taming's KL-autoencoder setting; a VQGAN needs double_z: False")
        for c in {self.ch * m for m in self.ch_mult}:
            if c % 32:
                raise ValueError(f"ch * ch_mult = {c} channels: GroupNorm(32) needs multiples of 32")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"resolution={self.resolution} is not divisible by 2**(len(ch_mult)-1)")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    # swish written out as in taming (not F.silu) so results match it bit for bit
    return x * torch.sigmoid(x)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def images_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], the VQGAN's input range."""
    return torch.as_tensor(images).float().div(127.5).sub(1.0)


def unit_to_images(x: torch.Tensor) -> torch.Tensor:
    """float in about [-1, 1] -> uint8 (B, 3, H, W)."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom only (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 `nin_shortcut` when the width changes.

    taming's VQGAN builds these with temb_channels=0 and conv_shortcut=False,
    so there is no `temb_proj` and no 3x3 `conv_shortcut`."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)  # (B, C_out, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, hh, ww = q.shape
        # explicit bmm in taming's order (not scaled_dot_product_attention) to reproduce its numbers
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # (B, HW, C)
        k = k.reshape(b, c, hh * ww)  # (B, C, HW)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))  # (B, HW_q, HW_k)
        w_ = F.softmax(w_, dim=2)
        v = v.reshape(b, c, hh * ww)  # (B, C, HW)
        h_ = torch.bmm(v, w_.permute(0, 2, 1))  # (B, C, HW_q)
        h_ = h_.reshape(b, c, hh, ww)  # (B, C, H, W)
        return x + self.proj_out(h_)


class Level(nn.Module):
    """One resolution: ResnetBlocks (each followed by an AttnBlock at attention resolutions), then an optional
    resample. Encoder levels (taming's `down.i.*`) end in a Downsample except the last; decoder levels (`up.i.*`)
    in an Upsample except level 0. The attribute names give taming's keys `block.j`, `attn.j`,
    `downsample` / `upsample`."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, use_attn: bool, resample: str | None, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if use_attn else 0))
        if resample == "down":
            self.downsample = Downsample(c_out)  # (B, C, H/2, W/2)
        elif resample == "up":
            self.upsample = Upsample(c_out)  # (B, C, 2H, 2W)
        elif resample is not None:
            raise ValueError(f"resample={resample!r}: expected 'down', 'up' or None")
        # The module's name, not the module: a second attribute holding it would add duplicate state-dict keys.
        self.resample = f"{resample}sample" if resample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h if self.resample is None else getattr(self, self.resample)(h)


class MidBlock(nn.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution (`mid.block_1`, `mid.attn_1`, ...)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, z_channels, h, w), h = H / 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        in_ch_mult = (1,) + cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i in range(n_levels):
            self.down.append(Level(cfg.ch * in_ch_mult[i], cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks,
                                   res in cfg.attn_resolutions, "down" if i != n_levels - 1 else None, cfg.dropout))
            if i != n_levels - 1:
                res //= 2
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = MidBlock(c, cfg.dropout)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, C_last, h, w)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, out_ch, H, W)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n_levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(c, cfg.dropout)
        # built from the lowest resolution up, stored so that up[i] is level i (taming's key order)
        levels: list[Level] = []
        for i in reversed(range(n_levels)):
            c_out = cfg.ch * cfg.ch_mult[i]
            levels.insert(0, Level(c, c_out, cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                                   "up" if i != 0 else None, cfg.dropout))
            c = c_out
            if i != 0:
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_last, h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, out_ch, H, W)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with a straight-through gradient (taming's VectorQuantizer2, legacy=True).

    Loss (VQ-VAE, van den Oord et al. 2017, Eq. 3; Taming Transformers Eq. 4):
        L_vq = ||sg[z_q] - z||^2 + beta * ||z_q - sg[z]||^2
    with beta on the *codebook* term: taming's released models were trained with this
    order (its "legacy" beta placement), and we reproduce it rather than the paper's.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: str | None = None,
                 unknown_index: str | int = "random"):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        self.re_embed = n_e  # size of the index space callers see
        if remap is not None:
            if not os.path.isfile(remap):
                raise FileNotFoundError(f"tokenizer remap file {remap} not found")
            self.register_buffer("used", torch.as_tensor(np.load(remap)).long())
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index={unknown_index!r} is not 'random', 'extra' or an int")

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook ids (B, L) -> positions in `used`; codes outside it -> unknown_index."""
        match = inds[:, :, None] == self.used.to(inds)[None, None, :]  # (B, L, K_used)
        new = match.long().argmax(-1)  # (B, L)
        unknown = ~match.any(-1)
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape, device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in `used` (B, L) -> codebook ids; the "extra" id decodes as code used[0], as taming."""
        inds = inds.clone()
        inds[inds >= self.used.shape[0]] = 0
        return self.used.to(inds)[inds]  # (B, L)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (z_q (B, D, h, w) straight-through, loss, indices (B, h, w))."""
        b, _, hh, ww = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        z_flat = z.view(-1, self.e_dim)  # (B*L, D)
        e = self.embedding.weight  # (K, D)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, in taming's order and with its einsum
        d = (torch.sum(z_flat ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", z_flat, e.t()))  # (B*L, K)
        idx = torch.argmin(d, dim=1)  # (B*L,)
        z_q = self.embedding(idx).view(z.shape)  # (B, h, w, D)
        # VQ loss, Eq. 4 Taming Transformers (legacy beta placement, see class docstring)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through estimator: copy decoder gradients to the encoder
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        idx = idx.view(b, hh * ww)  # (B, L)
        if self.remap is not None:
            idx = self.remap_to_used(idx)
        return z_q, loss, idx.view(b, hh, ww)  # indices as (B, h, w): taming's sane_index_shape

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> codebook vectors (B, D, h, w)."""
        b, hh, ww = indices.shape
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(b, hh * ww)).view(b, hh, ww)
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)


class VQModel(nn.Module):
    """taming's VQModel without its training code: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

    Images are float (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg  # kept so a checkpoint rebuilds its model
        down = 2 ** (len(cfg.ch_mult) - 1)
        self.grid = (cfg.resolution // down, cfg.resolution // down)  # (h, w) token grid at `resolution`
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25, remap=cfg.remap,
                                        unknown_index=cfg.unknown_index)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def vocab_size(self) -> int:
        """Size of the index space of `encode_to_indices` (n_embed, or the remapped size with `remap`)."""
        return self.quantize.re_embed

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> (z_q (B, D, h, w), codebook loss, indices (B, h, w))."""
        h = self.quant_conv(self.encoder(x))  # (B, D, h, w)
        return self.quantize(h)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, h, w) -> x_rec (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, loss, _ = self.encode(x)
        return self.decode(z_q), loss

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x float (B, 3, H, W) in [-1, 1] -> LongTensor (B, h, w)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or not x.is_floating_point():
            raise ValueError(f"encode_to_indices expects float (B, {self.cfg.in_channels}, H, W) in [-1, 1], "
                             f"got {x.dtype} {tuple(x.shape)}")
        return self.encode(x)[2]

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, h, w) -> float (B, 3, H, W) in about [-1, 1]."""
        if idx.ndim != 3 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"decode_indices expects integer (B, h, w), got {idx.dtype} {tuple(idx.shape)}")
        return self.decode(self.quantize.get_codebook_entry(idx.long()))


# taming's VQModel target; other first stages (GumbelVQ, EMAVQModel, KL autoencoders) have other weights
TAMING_TARGETS = ("taming.models.vqgan.VQModel",)


def read_yaml(path: str, option: str) -> Any:
    """A YAML file as an OmegaConf node; a missing file or bad YAML is a one-line error naming `option`."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}={path}: file not found")
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        reason = getattr(e, "problem", None) or e
        raise ValueError(f"{option}={path}: not valid YAML{at} ({reason})") from None


def config_from_taming_yaml(config_path: str) -> VQGANConfig:
    """model.params of a taming project.yaml -> VQGANConfig."""
    return config_from_taming_model(read_yaml(config_path, "tokenizer.config").get("model"),
                                    f"tokenizer.config={config_path}")


def config_from_taming_model(model: Any, where: str) -> VQGANConfig:
    """A taming VQModel's config node (target + params, as under `model:` of its project.yaml or under
    `first_stage_config:` of a transformer's) -> VQGANConfig; `where` names it in errors."""
    if model is None or model.get("params") is None or model.params.get("ddconfig") is None:
        raise ValueError(f"{where} has no model.params.ddconfig (not a taming project.yaml)")
    target = model.get("target")
    if target is not None and target not in TAMING_TARGETS:
        raise ValueError(f"{where}: model.target={target} is not {TAMING_TARGETS[0]}")
    p, dd = model.params, model.params.ddconfig
    try:
        return VQGANConfig(
            resolution=int(dd.resolution), in_channels=int(dd.get("in_channels", 3)), out_ch=int(dd.get("out_ch", 3)),
            ch=int(dd.ch), ch_mult=tuple(dd.ch_mult), num_res_blocks=int(dd.num_res_blocks),
            attn_resolutions=tuple(dd.attn_resolutions), z_channels=int(dd.z_channels),
            embed_dim=int(p.embed_dim), n_embed=int(p.n_embed), dropout=float(dd.get("dropout", 0.0)),
            # taming's Encoder defaults to double_z=True when the yaml omits it
            double_z=bool(dd.get("double_z", True)),
            remap=p.get("remap"), unknown_index=p.get("unknown_index", "random"))
    except Exception as e:  # missing keys in the yaml, bad values
        raise ValueError(f"{where}: {e}") from None


def load_taming_vqgan(ckpt_path: str, config_path: str) -> VQModel:
    """A released taming-transformers VQGAN (`last.ckpt` + `project.yaml`) as a VQModel in eval mode.
    Keys under `loss.` (LPIPS, discriminator) are ignored."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"tokenizer.ckpt={ckpt_path}: file not found")
    cfg = config_from_taming_yaml(config_path)
    sd = read_lightning_state_dict(ckpt_path, "tokenizer.ckpt")
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    return taming_vqgan_from_state_dict(sd, cfg, f"tokenizer.ckpt={ckpt_path} does not match "
                                                 f"tokenizer.config={config_path}")


def taming_vqgan_from_state_dict(sd: dict[str, torch.Tensor], cfg: VQGANConfig, mismatch: str) -> VQModel:
    """The VQModel of `cfg` holding the weights `sd` (taming's key names), in eval mode; a missing, extra or
    misshapen key is a one-line ValueError starting with `mismatch`."""
    expected = vqgan_keys(cfg)
    if "quantize.used" in sd:  # remap baked into the checkpoint: the npy of the yaml must agree
        if cfg.remap is None:
            raise ValueError(f"{mismatch}: unexpected key quantize.used (the yaml has no remap)")
        expected["quantize.used"] = tuple(np.load(cfg.remap).shape)
    check_keys(sd, expected, mismatch)
    model = VQModel(cfg)
    model.load_state_dict(sd, strict=cfg.remap is None or "quantize.used" in sd)
    return model.eval()


def vqgan_keys(cfg: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the VQModel of cfg without a remap (taming's names), in module order."""
    with torch.device("meta"):  # no point initialising 70M weights only to read their shapes
        probe = VQModel(VQGANConfig(**{**cfg.__dict__, "remap": None}))
    return {k: tuple(v.shape) for k, v in probe.state_dict().items()}


def check_keys(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], mismatch: str) -> None:
    """sd holds exactly the keys of `expected`, each with its shape; else a one-line ValueError naming the first
    mismatching key (missing or misshapen ones in `expected`'s order, then extra ones in sorted order)."""
    for k, shape in expected.items():
        if k not in sd:
            raise ValueError(f"{mismatch}: missing key {k}")
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"{mismatch}: {k} has shape {tuple(sd[k].shape)}, config gives {tuple(shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise ValueError(f"{mismatch}: unexpected key {extra[0]}")


def read_lightning_state_dict(path: str, option: str) -> dict[str, torch.Tensor]:
    """The state_dict of a PyTorch Lightning 1.x checkpoint (or of a bare state-dict file), read safely.

    The checkpoint is read with weights_only=True: no pickled code runs. Lightning checkpoints also hold plain
    metadata (epoch, global_step, optimizer states, callbacks); anything beyond tensors and containers must be on
    the allow-list of _lightning_safe_globals or loading fails, with one line naming `option`."""
    try:
        with torch.serialization.safe_globals(_lightning_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{option}={path} cannot be loaded safely (weights_only=True): "
                         f"{_load_error_reason(e)}") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{option}={path} holds no state_dict")
    return sd


def _load_error_reason(e: Exception) -> str:
    """One line out of torch.load's multi-paragraph error: the refused global when there is one."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if m:
        return f"it holds the non-allow-listed global {m.group(1)} (pickled code or an unknown class)"
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    if m:
        # Not the advice to load with weights_only=False that torch's message leads with: bytes that are no
        # checkpoint (random, another format) fail here too, and running their pickle would be the wrong fix.
        return f"not a PyTorch checkpoint, or a damaged one ({m.group(1).strip()})"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class LightningModelCheckpointKey:
    """Stand-in for the `ModelCheckpoint` class that Lightning 1.0-1.4 uses as a dict key under `callbacks`.

    The class is only referenced (a pickle GLOBAL), never instantiated, so mapping its name to this
    inert class lets weights_only=True read the checkpoint without pytorch_lightning installed."""


def _lightning_safe_globals() -> list:
    """The non-tensor globals of a taming (PyTorch Lightning 1.x) checkpoint, all data and no code.

    Everything else (arbitrary classes, functions) is still refused by weights_only=True."""
    try:  # numpy scalars, e.g. a logged best score; numpy 2 moved numpy.core to numpy._core
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar

    allowed: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]  # numpy.dtypes.*
    allowed += [(LightningModelCheckpointKey, f"pytorch_lightning.callbacks.{m}ModelCheckpoint")
                for m in ("model_checkpoint.", "")]
    return allowed
