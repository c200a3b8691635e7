"""The VQGAN tokenizer: taming-transformers' `VQModel` (Esser et al., CVPR 2021).

A clean re-implementation of `taming/models/vqgan.py`,
`taming/modules/diffusionmodules/model.py` (Encoder, Decoder) and
`taming/modules/vqvae/quantize.py` (VectorQuantizer2). Module names, and so
state-dict keys and shapes, are taming's, so a released taming checkpoint loads
with `image_tokenizers.taming.load_taming_vqgan`, and the forward pass runs the same ops in the same
order (swish as x*sigmoid(x), GroupNorm(32, eps=1e-6), the asymmetric
pad-then-stride-2 downsampling, the bmm attention, the squared-distance argmin
of the quantizer) so tokens match taming's bit for bit on the same device.

Shapes: B batch, C channels, H x W pixels, h x w = grid of tokens (L = h*w),
K = n_embed codebook entries, D = embed_dim.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from image_tokenizers.base import Tokenizer


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


class IndexCodecTokenizer(Tokenizer):
    """A tokenizer whose codec, once loaded (`use`), is a module with encode_to_indices (float images in [-1, 1]
    -> (B, h, w) ids) and decode_indices (the inverse): a VQModel, or a release's own first stage."""

    def use(self, model: nn.Module, device: str) -> None:
        """Encode and decode with `model` from now on (load's last step)."""
        self.model = model.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.model.encode_to_indices(images_to_unit(images).to(self.device))  # (B, h, w)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return unit_to_images(self.model.decode_indices(codes.to(self.device)))  # (B, C, H, W) uint8


class VQModelTokenizer(IndexCodecTokenizer):
    """A tokenizer whose codec is a VQModel (`self.model` once loaded): the trained VQGAN and taming's releases."""

    @property
    @abc.abstractmethod
    def model_config(self) -> VQGANConfig:
        """The VQModel's architecture, known before any weights are read."""

    @property
    def codebook_size(self) -> int:
        return self.model_config.n_embed

    @property
    def grid(self) -> tuple[int, int]:
        down = 2 ** (len(self.model_config.ch_mult) - 1)
        return self.resolution // down, self.resolution // down

    def flops(self) -> tuple[float, float]:
        """(encoder, decoder) FLOPs of one image (quant convs included), counted on the meta device: no weights,
        no arithmetic."""
        from torch.utils.flop_counter import FlopCounterMode

        cfg = self.model_config
        key = repr(cfg)
        if key not in _FLOPS:
            with torch.device("meta"):
                model = VQModel(cfg)
                x = torch.zeros(1, cfg.in_channels, cfg.resolution, cfg.resolution)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                h = model.quant_conv(model.encoder(x))
            encode = float(counter.get_total_flops())
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model.decode(h)
            _FLOPS[key] = (encode, float(counter.get_total_flops()))
        return _FLOPS[key]


_FLOPS: dict[str, tuple[float, float]] = {}  # VQModelTokenizer.flops by architecture
