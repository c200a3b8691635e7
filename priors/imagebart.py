"""ImageBART prior (Esser et al., NeurIPS 2021): a fixed multinomial diffusion over the
token grid, reversed by a chain of T - 1 independently trained autoregressive transformers.

Chain, in the paper's indexing: x_1 are the (effective-codebook) tokens, x_2 ... x_T are
ever noisier copies made by the forward process of Eq. 5; beta_T = 1, so x_T is uniform
noise. Scale t (unit f"scale{t}", t = 2..T) models p(x_{t-1} | x_t):

- t < T: an encoder-decoder transformer. The bidirectional encoder reads x_t once; the causal
  decoder generates x_{t-1} in raster order from a start id and cross-attends to the encoder.
- t = T: decoder-only (x_T is independent of everything), i.e. an AR model of x_{T-1}.
  T = 2 is therefore exactly one AR model of x_1 (Taming Transformers).

Losses: Eq. 8 (cross-entropy of x_1 given x_2 ~ q(x_2|x_1)) for scale 2, Eq. 7 (analytic
KL between the forward posterior and the model) for scales t > 2. Completion is the masked
forward-backward process of appendix A.3, Eq. 10-12.

Indexing convention used throughout this file: schedule lists are indexed by t itself,
`betas[t]` and `alpha_bars[t]` for t = 1..T (index 0 is unused padding, beta_1 = 0,
alpha_bar_1 = 1), so every formula reads as in the paper.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from priors.base import NLL, Prior, eval_mode, generated_span
from priors.flops import decoder_sample_flops, encoder_flops
from priors.options import LogitSampling, check_transformer, options_from
from priors.transformer import (BUDGET_TOLERANCE, KVCache, Transformer, TransformerConfig, compiled, count_params,
                                decode_threads, fit_d_model, full_logits, sample_logits)

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------

def check_T(T: Any) -> int:
    """The chain length must be an integer >= 2 (x_1 data, x_T noise)."""
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or int(T) < 2:
        raise ValueError(f"T={T!r}: imagebart needs an integer chain length T >= 2 "
                         "(T = 2 is a single AR model)")
    return int(T)


def linear_alpha_bars(T: int) -> list[float]:
    """alpha_bar_t linear in t, from 1 at t = 1 to 0 at t = T (padded to index t).

    This is the official code's "geometric" redraw schedule, beta_t = 1 / (T - t + 1):
    prod_{l=2..t} (1 - 1/(T-l+1)) = (T - t) / (T - 1).
    """
    T = check_T(T)
    return [1.0] + [(T - t) / (T - 1) for t in range(1, T + 1)]


def betas_to_alpha_bars(betas: Sequence[float]) -> list[float]:
    """alpha_bar_t = prod_{l=2..t} (1 - beta_l) (Eq. 6, ImageBART); betas padded to index t."""
    out = [1.0, 1.0]
    for t in range(2, len(betas)):
        out.append(out[-1] * (1.0 - float(betas[t])))
    return out


def alpha_bars_to_betas(alpha_bars: Sequence[float]) -> list[float]:
    """Inverse of betas_to_alpha_bars: beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}."""
    out = [0.0, 0.0]
    for t in range(2, len(alpha_bars)):
        out.append(1.0 - float(alpha_bars[t]) / float(alpha_bars[t - 1]))
    return out


def make_betas(schedule: Any, T: int) -> list[float]:
    """Parse the `prior.schedule` option into betas padded to index t (length T + 1).

    schedule: "linear" | {"betas": [beta_2, ..., beta_T]} | {"alpha_bars": [alpha_bar_2, ..., alpha_bar_T]}.
    Explicit betas must lie in (0, 1] with beta_T = 1 (ImageBART Tab. 5 lists them this way);
    explicit alpha_bars must be non-increasing in [0, 1], positive before the last, last = 0.
    """
    T = check_T(T)
    if isinstance(schedule, str):
        if schedule != "linear":
            raise ValueError(f"prior.schedule={schedule!r}: expected 'linear', {{betas: [...]}} "
                             "or {alpha_bars: [...]}")
        betas = alpha_bars_to_betas(linear_alpha_bars(T))
        betas[T] = 1.0  # exact, not 1 - 0/x rounding
        return betas
    if not isinstance(schedule, Mapping) or len(schedule) != 1 or \
            next(iter(schedule)) not in ("betas", "alpha_bars"):
        raise ValueError(f"prior.schedule={schedule!r}: expected 'linear', {{betas: [...]}} "
                         "or {alpha_bars: [...]}")
    key, values = next(iter(schedule.items()))
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"prior.schedule.{key}={values!r}: expected a list of numbers") from None
    if len(values) != T - 1:
        raise ValueError(f"prior.schedule.{key} has {len(values)} values, T={T} needs T-1={T - 1} "
                         f"(t = 2..{T})")
    if key == "betas":
        if any(not (0.0 < b <= 1.0) for b in values):
            raise ValueError(f"prior.schedule.betas={values}: every beta must lie in (0, 1]")
        if values[-1] != 1.0:
            raise ValueError(f"prior.schedule.betas={values}: the last beta (beta_T) must be 1 "
                             "so that x_T is uniform noise")
        return [0.0, 0.0] + values
    # alpha_bars
    if any(not (0.0 <= a <= 1.0) for a in values):
        raise ValueError(f"prior.schedule.alpha_bars={values}: every alpha_bar must lie in [0, 1]")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"prior.schedule.alpha_bars={values}: must be non-increasing in t")
    if values[-1] != 0.0:
        raise ValueError(f"prior.schedule.alpha_bars={values}: the last alpha_bar (alpha_bar_T) "
                         "must be 0 so that x_T is uniform noise")
    if any(a == 0.0 for a in values[:-1]):
        raise ValueError(f"prior.schedule.alpha_bars={values}: only alpha_bar_T may be 0 "
                         "(a zero earlier would leave later betas undefined)")
    betas = alpha_bars_to_betas([1.0, 1.0] + values)
    betas[T] = 1.0
    return betas


# ---------------------------------------------------------------------------------------------
# Forward process (pure functions; x are integer ids in [0, V), probabilities over the last dim)
# ---------------------------------------------------------------------------------------------

def q_onestep_probs(x_prev: torch.Tensor, beta: float, V: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q(x_t | x_{t-1}) = C((1 - beta_t) e(x_{t-1}) + beta_t 1/K)  (Eq. 5, ImageBART). (...,) -> (..., V)"""
    return (1.0 - beta) * F.one_hot(x_prev, V).to(dtype) + beta / V


def q_marginal_probs(x1: torch.Tensor, alpha_bar: float, V: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q(x_t | x_1) = C(alpha_bar_t e(x_1) + (1 - alpha_bar_t) 1/K)  (Eq. 6, ImageBART). (...,) -> (..., V)"""
    return alpha_bar * F.one_hot(x1, V).to(dtype) + (1.0 - alpha_bar) / V


def q_posterior_probs(x_t: torch.Tensor, x1: torch.Tensor, beta_t: float, alpha_bar_prev: float,
                      V: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q(x_{t-1} | x_t, x_1) = q(x_t | x_{t-1}) q(x_{t-1} | x_1) / q(x_t | x_1), per position (Bayes,
    ImageBART Sec. 3.3). alpha_bar_prev = alpha_bar_{t-1}. (...,) -> (..., V), a distribution over x_{t-1}.

    Eq. 5 is symmetric in (x_t, x_{t-1}), so as a function of x_{t-1} = k the likelihood
    q(x_t | x_{t-1} = k) is the vector (1 - beta_t) e(x_t) + beta_t / V.
    """
    likelihood = q_onestep_probs(x_t, beta_t, V, dtype)  # (..., V) over x_{t-1}
    prior = q_marginal_probs(x1, alpha_bar_prev, V, dtype)  # (..., V)
    joint = likelihood * prior
    # The normaliser equals q(x_t | x_1) of Eq. 6 (checked in the tests).
    return joint / joint.sum(-1, keepdim=True)


def _generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _resample(x: torch.Tensor, p_replace: float, V: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """Replace each entry by a uniform draw over V with probability p_replace.

    Keeping with probability 1 - p and drawing uniformly (possibly the same id) with probability p
    is exactly the categorical (1 - p) e(x) + p 1/V of Eq. 5 / Eq. 6.
    """
    dev = _generator_device(generator, x.device)
    u = torch.rand(x.shape, generator=generator, device=dev).to(x.device)
    r = torch.randint(0, V, x.shape, generator=generator, device=dev).to(x.device)
    return torch.where(u < p_replace, r, x)


def q_sample_onestep(x_prev: torch.Tensor, beta: float, V: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t ~ q(x_t | x_{t-1}) (Eq. 5). (B, L) -> (B, L)"""
    return _resample(x_prev, beta, V, generator)


def q_sample_marginal(x1: torch.Tensor, alpha_bar: float, V: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t ~ q(x_t | x_1) (Eq. 6). (B, L) -> (B, L)"""
    return _resample(x1, 1.0 - alpha_bar, V, generator)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in at least float32: a bf16 head output (autocast) would distort the loss and the ELBO."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.log_softmax(-1)


def categorical_kl(q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) over the last dim, with 0 log 0 = 0 (posteriors can have exact zeros). (..., V) -> (...)"""
    return (torch.xlogy(q, q) - q * log_p).sum(-1)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

@dataclass
class ScaleConfig:
    vocab_size: int  # V = K_eff; the decoder also embeds the start id V
    seq_len: int  # L = H*W tokens of x_t and x_{t-1}
    n_enc_layer: int  # encoder layers; 0 = decoder-only (the last scale, whose input x_T is pure noise)
    n_dec_layer: int  # decoder layers (causal self-attention, cross-attention when n_enc_layer > 0)
    n_head: int  # attention heads of encoder and decoder
    d_model: int  # width D of encoder and decoder (one width per scale, ImageBART Tab. 6)
    dropout: float = 0.0  # dropout inside both transformers
    # beta_t of this scale's forward step when the logits carry the likelihood residual (see ScaleModel);
    # None = plain logits (the decoder-only last scale, whose beta_T = 1 makes the residual a constant)
    residual_beta: float | None = None
    # Options for released chains (releases/imagebart.py); the defaults are the architecture trained here.
    start_id: int | None = None  # the decoder's start id: None = the extra id V; a code id in [0, V) adds no row
    enc_prefix: int | None = None  # an id the encoder reads before x_t (its memory is then L + 1 long)
    attn_dim: int | None = None  # width of queries/keys/values in both transformers (TransformerConfig.attn_dim)
    head_bias: bool = False  # a bias on the decoder's output logits


class ScaleModel(nn.Module):
    """One reverse transition p(x_{t-1} | x_t): bidirectional encoder over x_t, AR decoder over x_{t-1}.

    Likelihood residual (the official code's ResidualScaledXTransformer): the forward posterior is
    q(x_{t-1} | x_t, x_1) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_1), and its first factor is known in closed form.
    So the logits of position i are exp(s) * decoder_i + log q(x_t^i | x_{t-1}^i = k) over k, with one learned
    log-scale s: the network only has to learn the second factor (what x_1 was likely to be), instead of
    first discovering through cross-attention that x_{t-1}^i is mostly x_t^i. Without it the scales need far
    more steps to reach the per-token baseline, and the ELBO of a T = 9 chain sums eight large gaps.
    """

    def __init__(self, cfg: ScaleConfig):
        super().__init__()
        self.cfg = cfg
        V = cfg.vocab_size
        for name in ("start_id", "enc_prefix"):
            value = getattr(cfg, name)
            if value is not None and not 0 <= value < V:
                raise ValueError(f"{name}={value} must be a code id in [0, {V}) or None")
        # decoder input id V starts every sequence, unless a code id is given (released chains)
        self.start_id = V if cfg.start_id is None else int(cfg.start_id)
        if cfg.n_enc_layer > 0:
            self.encoder = Transformer(TransformerConfig(
                vocab_in=V, vocab_out=0, seq_len=cfg.seq_len + (cfg.enc_prefix is not None),
                n_layer=cfg.n_enc_layer, n_head=cfg.n_head, d_model=cfg.d_model, causal=False, cross_attn=False,
                dropout=cfg.dropout, attn_dim=cfg.attn_dim))
        else:
            self.encoder = None
        self.decoder = Transformer(TransformerConfig(
            vocab_in=V + (cfg.start_id is None), vocab_out=V, seq_len=cfg.seq_len,
            n_layer=cfg.n_dec_layer, n_head=cfg.n_head, d_model=cfg.d_model, causal=True,
            cross_attn=self.encoder is not None, dropout=cfg.dropout, attn_dim=cfg.attn_dim,
            head_bias=cfg.head_bias))
        self.log_scale = nn.Parameter(torch.zeros(())) if cfg.residual_beta is not None else None

    def output_logits(self, logits: torch.Tensor, x_t: torch.Tensor | None) -> torch.Tensor:
        """Decoder head output (B, l, V) -> logits of p(x_{t-1}^i | ...) at the same positions, adding the
        likelihood residual log((1 - beta_t) e(x_t^i) + beta_t / V) (Eq. 5 read as a function of x_{t-1});
        x_t (B, l) holds x_t at those positions."""
        if self.log_scale is None:
            return logits
        beta, V = self.cfg.residual_beta, self.cfg.vocab_size
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 head outputs (autocast) go to fp32
        residual = torch.log(q_onestep_probs(x_t, beta, V, dtype))  # (B, l, V)
        return logits.to(dtype) * self.log_scale.to(dtype).exp() + residual

    def residual_table(self, x_t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What output_logits adds and multiplies at every position, computed once per scale for a decoding
        loop: (exp(s), the residual (B, L, V)), by output_logits' own operations (so the same bits); None
        without a likelihood residual."""
        if self.log_scale is None:
            return None
        dtype = torch.promote_types(dtype, torch.float32)
        beta, V = self.cfg.residual_beta, self.cfg.vocab_size
        return self.log_scale.to(dtype).exp(), torch.log(q_onestep_probs(x_t, beta, V, dtype))  # (), (B, L, V)

    def encode(self, x_t: torch.Tensor) -> torch.Tensor | None:
        """Encoder memory of x_t (B, L, D), computed once per scale; None for the decoder-only scale.
        With enc_prefix the encoder reads [enc_prefix, x_t] and the memory is (B, L + 1, D)."""
        if self.encoder is None:
            return None
        if self.cfg.enc_prefix is not None:
            x_t = torch.cat([torch.full_like(x_t[:, :1], self.cfg.enc_prefix), x_t], dim=1)  # (B, L + 1)
        return full_logits(self.encoder, x_t)  # (B, L, D) or (B, L + 1, D): the fused pass when sampling on a CPU

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor | None) -> torch.Tensor:
        """Teacher-forced logits of p(x_{t-1}^i | x_{t-1}^{<i}, x_t) for every i. (B, L) -> (B, L, V)"""
        start = torch.full_like(x_prev[:, :1], self.start_id)
        dec_in = torch.cat([start, x_prev[:, :-1]], dim=1)  # (B, L): shifted right by the start id
        return self.output_logits(self.decoder(dec_in, memory=self.encode(x_t)), x_t)  # (B, L, V)


@dataclass
class SampleConfig(LogitSampling):
    """The `sample:` block (temperature, top_k, top_p from LogitSampling): sampling-only, never part of a checkpoint."""
    # extra forward-backward passes x_2 ~ q^{2,m}, x_1 ~ p^{1,m} after the masked reverse chain (A.3, Eq. 12);
    # 0 = one masked pass through the reverse chain, the completion protocol of Tab. 3
    completion_passes: int = 0
    use_cache: bool = True  # decode with the KV cache; False recomputes the prefix every step (same samples)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.completion_passes < 0:
            raise ValueError(f"prior.sample.completion_passes={self.completion_passes!r} must be an integer >= 0")


def layer_split(n_layer: int, enc_frac: float = 0.5, n_enc_layer: int | None = None) -> tuple[int, int]:
    """(encoder, decoder) layers of an encoder-decoder scale with n_layer layers in total (ImageBART A.5).

    n_enc_layer, when given, wins over enc_frac. Both parts need at least one layer.
    """
    n_layer = int(n_layer)
    if n_enc_layer is None:
        if not (0.0 < float(enc_frac) < 1.0):
            raise ValueError(f"prior.enc_frac={enc_frac!r}: must lie in (0, 1)")
        n_enc_layer = int(round(float(enc_frac) * n_layer))
        n_enc_layer = min(max(n_enc_layer, 1), n_layer - 1)
    n_enc_layer = int(n_enc_layer)
    if n_layer < 2 or not (1 <= n_enc_layer <= n_layer - 1):
        raise ValueError(f"prior.n_enc_layer={n_enc_layer} with prior.n_layer={n_layer}: an encoder-decoder "
                         "scale needs at least one encoder and one decoder layer")
    return n_enc_layer, n_layer - n_enc_layer


@dataclass
class ImageBARTConfig:
    """ImageBART's architecture (arch_config() is its asdict): the forward chain and the T - 1 scale models."""
    vocab_size: int  # V = K_eff codes; every decoder also embeds the start id V
    grid: list[int]  # [H, W]: L = H*W tokens of every x_t
    T: int  # chain length: x_1 the data ... x_T uniform noise; T - 1 trained scales (T = 2: one AR model)
    n_layer: int = 4  # layers per scale: encoder + decoder for t < T; the last scale is decoder-only (Tab. 6)
    n_head: int = 4  # attention heads of every transformer
    d_model: list[int] = field(default_factory=list)  # widths of scales t = 2..T (from_budget fits them; [] until then)
    enc_frac: float = 0.5  # fraction of n_layer in the encoder of scales t < T (A.5); >= 1 layer on each side
    n_enc_layer: int | None = None  # explicit encoder layers of scales t < T; wins over enc_frac
    dropout: float = 0.0  # dropout inside both transformers while training
    schedule: Any = "linear"  # "linear" | {betas: [beta_2, ..., beta_T]} | {alpha_bars: [...]} (make_betas)
    likelihood_residual: bool = True  # add log q(x_t | x_{t-1}) to the logits of scales t < T (ScaleModel)
    # Per-scale overrides for released chains (releases/imagebart.py), one mapping per scale t = 2..T of
    # SCALE_OPTIONS (ScaleConfig's fields); None = every scale as above.
    scale_options: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.T = check_T(self.T)
        self.grid = list(self.grid)
        check_transformer(self.n_layer, self.n_head, self.dropout)
        make_betas(self.schedule, self.T)  # a bad schedule raises before it is stored
        self.schedule = _plain(self.schedule)
        if self.T > 2:
            layer_split(self.n_layer, self.enc_frac, self.n_enc_layer)
        if self.d_model and len(self.d_model) != self.T - 1:
            raise ValueError(f"prior.d_model has {len(self.d_model)} widths, T={self.T} needs {self.T - 1}")
        if self.scale_options is not None:
            self.scale_options = check_scale_options(self.scale_options, self.T)


SCALE_OPTIONS = ("n_enc_layer", "n_dec_layer", "start_id", "enc_prefix", "attn_dim", "head_bias")


def check_scale_options(options: Any, T: int) -> list[dict[str, Any]]:
    """`prior.scale_options` as T - 1 plain dicts whose keys are in SCALE_OPTIONS (one-line errors)."""
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence) or len(options) != T - 1:
        raise ValueError(f"prior.scale_options={options!r}: expected a list of T-1={T - 1} mappings (t = 2..{T})")
    out = []
    for t, o in zip(range(2, T + 1), options):
        if not isinstance(o, Mapping):
            raise ValueError(f"prior.scale_options[{t - 2}]={o!r}: expected a mapping")
        unknown = sorted(set(o) - set(SCALE_OPTIONS))
        if unknown:
            raise ValueError(f"prior.scale_options[{t - 2}] has unknown keys {unknown}; known: {list(SCALE_OPTIONS)}")
        out.append({str(k): (bool(v) if k == "head_bias" else None if v is None else int(v)) for k, v in o.items()})
    return out


class ImageBARTPrior(Prior):
    name = "imagebart"
    label = "ImageBART"  # how reports name it
    T_applies = "training"  # T is the chain length: T - 1 trained scales
    validation_keys = ("ce_bits_per_token", "kl_bits_per_token")  # scale 2: Eq. 8; scales t > 2: Eq. 7
    size_options = ("n_layer", "n_head")
    validation_note = ("scale 2's is Eq. 8's cross-entropy and scales t > 2 the Eq. 7 KL terms, so their sum is its "
                       "ELBO on the selection batches")

    def __init__(self, vocab_size: int, grid: tuple[int, int], T: int, n_layer: int = 4, n_head: int = 4,
                 d_model: int | Sequence[int] = 64, enc_frac: float = 0.5, n_enc_layer: int | None = None,
                 dropout: float = 0.0, schedule: Any = "linear", likelihood_residual: bool = True,
                 scale_options: Sequence[Mapping[str, Any]] | None = None, sample: Mapping | None = None):
        """d_model: one width for every scale, or a list of T - 1 widths for scales t = 2..T.
        likelihood_residual: add log q(x_t | x_{t-1}) to the logits of the encoder-decoder scales (ScaleModel).
        scale_options: per-scale overrides of a released chain (ImageBARTConfig.scale_options)."""
        super().__init__(vocab_size, grid)
        T = check_T(T)
        d_models = [int(d_model)] * (T - 1) if isinstance(d_model, numbers.Integral) else [int(d) for d in d_model]
        self.arch = ImageBARTConfig(vocab_size=self.vocab_size, grid=list(self.grid), T=T, n_layer=int(n_layer),
                                    n_head=int(n_head), d_model=d_models, enc_frac=float(enc_frac),
                                    n_enc_layer=None if n_enc_layer is None else int(n_enc_layer),
                                    dropout=float(dropout), schedule=schedule,
                                    likelihood_residual=bool(likelihood_residual),
                                    scale_options=None if scale_options is None else list(scale_options))
        self.T = T
        self.betas = make_betas(self.arch.schedule, T)  # betas[t], t = 1..T (index 0/1 padding = 0)
        self.alpha_bars = betas_to_alpha_bars(self.betas)  # alpha_bars[t], alpha_bars[1] = 1
        self.sample_cfg = options_from(SampleConfig, sample, "prior.sample", owner=self.name)
        self.scales = nn.ModuleDict()
        for t in range(2, T + 1):
            self.scales[f"scale{t}"] = ScaleModel(self.scale_config(self.arch, t, d_models[t - 2], self.betas[t]))

    @staticmethod
    def scale_config(arch: ImageBARTConfig, t: int, d_model: int, beta: float) -> ScaleConfig:
        """Scale t's modules at width d_model; beta = beta_t feeds the likelihood residual (scales t < T)."""
        # Encoder-decoder scales share one split; the decoder-only last scale gets all n_layer
        # layers (ImageBART Tab. 6: 32/6 vs 0/36). For T = 2 there is no encoder-decoder scale.
        if t == arch.T:
            n_enc, n_dec = 0, int(arch.n_layer)  # x_T carries no information: decoder only
        else:
            n_enc, n_dec = layer_split(arch.n_layer, arch.enc_frac, arch.n_enc_layer)
        # No residual for the last scale: beta_T = 1 would make it the constant log(1/V).
        residual = arch.likelihood_residual and t < arch.T
        cfg = ScaleConfig(vocab_size=arch.vocab_size, seq_len=arch.grid[0] * arch.grid[1], n_enc_layer=n_enc,
                          n_dec_layer=n_dec, n_head=int(arch.n_head), d_model=int(d_model),
                          dropout=float(arch.dropout), residual_beta=float(beta) if residual else None)
        return cfg if arch.scale_options is None else replace(cfg, **arch.scale_options[t - 2])

    # ---- construction from a budget -----------------------------------------------------------
    @classmethod
    def from_budget(cls, vocab_size: int, grid: tuple[int, int], budget: int, T: int, *,
                    sample: Mapping[str, Any] | None = None, **options: Any) -> "ImageBARTPrior":
        """The prior whose T - 1 scales share `budget` equally (ImageBART Sec. 4.4, Tab. 3).

        options: those of conf/prior/imagebart.yaml (ImageBARTConfig's fields but the derived vocab_size, grid,
        T and d_model), with the sampling settings under `sample` (SampleConfig); unknown keys and bad values
        raise a one-line ValueError before any fitting work.

        Each scale's d_model comes from fit_d_model(budget // (T - 1)), fitted separately for the
        encoder-decoder scales and the decoder-only last scale (different shapes, as in Tab. 6).
        Small budgets can fall between two widths (d_model moves in steps of n_head) so that no
        single width is within 10% of the share; then the widths are balanced scale by scale
        (each takes the width nearest to what is left divided by the scales left), which keeps
        the total within 10% while single scales may be up to ~n_head/d_model off their share.
        """
        arch = options_from(ImageBARTConfig, options, "prior", owner=cls.name, others=("sample",),
                            vocab_size=int(vocab_size), grid=[int(grid[0]), int(grid[1])], T=T, d_model=[])
        options_from(SampleConfig, sample, "prior.sample", owner=cls.name)
        T, budget, betas = arch.T, int(budget), make_betas(arch.schedule, arch.T)

        def count(t: int) -> Callable[[int], int]:  # parameters of scale t at width d
            return lambda d: count_params(cls.scale_config(arch, t, d, betas[t]), ScaleModel)

        share = budget // (T - 1)
        equal = {t: fit_d_model(share, count(t), arch.n_head, check=False) for t in (2, T)}  # enc-dec, last
        d_models = [equal[T if t == T else 2] for t in range(2, T + 1)]
        if any(abs(count(t)(d) - share) > BUDGET_TOLERANCE * share for t, d in equal.items()):
            d_models, left = [], budget
            for t in range(2, T + 1):
                d_models.append(fit_d_model(left / (T + 1 - t), count(t), arch.n_head, check=False))
                left -= count(t)(d_models[-1])
            if abs(left) > BUDGET_TOLERANCE * budget:
                raise ValueError(f"budget.params={budget} is too small for imagebart T={T}: it is split equally "
                                 f"over T-1={T - 1} scales (ImageBART Tab. 3), and the closest widths "
                                 f"d_model={d_models} have {budget - left} parameters ({-left / budget:+.0%}; "
                                 f"at most {BUDGET_TOLERANCE:.0%} allowed)")
        return cls(**asdict(replace(arch, d_model=d_models)), sample=sample)

    def set_eval_options(self, T: int | None, options: Mapping[str, Any]) -> None:
        if T is not None and int(T) != self.T:
            raise ValueError(f"T={T}: this chain has T={self.T} ({self.T - 1} trained scales); T is its length")
        self.sample_cfg = options_from(SampleConfig, options.get("sample"), "prior.sample", owner=self.name)

    def arch_config(self) -> dict[str, Any]:
        arch = asdict(self.arch)
        if arch["scale_options"] is None:  # chains trained here: the same dict as before the option existed, so
            del arch["scale_options"]  # their checkpoints' stored arch still matches
        return arch

    # ---- training -----------------------------------------------------------------------------
    def units(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.scales.items()}

    def _scale(self, t: int) -> ScaleModel:
        return self.scales[f"scale{t}"]

    def _forward_pair(self, t: int, x1: torch.Tensor, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t-1}, x_t) drawn jointly from the forward chain given x_1: x_{t-1} ~ q(x_{t-1}|x_1) (Eq. 6),
        x_t ~ q(x_t|x_{t-1}) (Eq. 5). Hence x_{t-1} | x_t, x_1 follows the posterior, which is what the
        teacher-forced KL estimate needs."""
        V = self.vocab_size
        x_prev = x1 if t == 2 else q_sample_marginal(x1, self.alpha_bars[t - 1], V, generator)
        x_t = q_sample_onestep(x_prev, self.betas[t], V, generator)
        return x_prev, x_t

    def _scale_terms(self, t: int, x1: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-sequence loss term of scale t in nats (B,): a single-sample estimate of
        t = 2: -log p(x_1 | x_2), x_2 ~ q(x_2 | x_1)                              (Eq. 8, ImageBART)
        t > 2: KL(q(x_{t-1} | x_t, x_1) || p(x_{t-1} | x_t)), x_t ~ q(x_t | x_1)   (Eq. 7, ImageBART)
        The KL between the factorised posterior and the AR model is, by the chain rule,
        sum_i E_{x_{t-1}^{<i} ~ q} KL(q(x_{t-1}^i | x_t, x_1) || p(x_{t-1}^i | x_{t-1}^{<i}, x_t)); the
        decoder is teacher-forced on one posterior sample x_{t-1} (as the official code does).
        For t = T the posterior is q(x_{T-1} | x_1) since beta_T = 1 makes x_T independent."""
        model = self._scale(t)
        x_prev, x_t = self._forward_pair(t, x1, generator)
        logits = model(x_prev, x_t if model.encoder is not None else None)  # (B, L, V)
        log_p = _log_probs(logits)  # (B, L, V)
        if t == 2:
            return -log_p.gather(-1, x_prev.unsqueeze(-1)).squeeze(-1).sum(-1)  # (B,)
        post = q_posterior_probs(x_t, x1, self.betas[t], self.alpha_bars[t - 1], self.vocab_size,
                                 log_p.dtype)  # (B, L, V)
        return categorical_kl(post, log_p).sum(-1)  # (B,)

    def unit_loss(self, unit: str, x: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        if unit not in self.scales:
            raise KeyError(f"unknown unit {unit!r}; units are {list(self.scales)}")
        t = int(unit[len("scale"):])
        per_seq = self._scale_terms(t, x, generator)  # (B,) nats
        loss = per_seq.mean() / self.seq_len  # nats per token
        kind = "ce" if t == 2 else "kl"
        return loss, {"loss": loss.item(), f"{kind}_bits_per_token": loss.item() / LN2}

    # ---- likelihood ---------------------------------------------------------------------------
    def seq_log_prob(self, t: int, x_prev: torch.Tensor, x_t: torch.Tensor | None) -> torch.Tensor:
        """log p(x_{t-1} | x_t) of whole sequences in nats (B,); x_t is ignored by the last scale."""
        model = self._scale(t)
        logits = model(x_prev, x_t if model.encoder is not None else None)  # (B, L, V)
        return _log_probs(logits).gather(-1, x_prev.unsqueeze(-1)).squeeze(-1).sum(-1)  # (B,)

    @torch.no_grad()
    def elbo_per_sequence(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Single-sample ELBO estimate of -log p(x_1) per sequence, in nats (B,):
        -log p(x_1|x_2) + sum_{t=3..T} KL_t  (+ KL(q(x_T|x_1) || p(x_T)) = 0: both uniform).
        Exact (no noise used) for T = 2."""
        terms = [self._scale_terms(t, x, generator) for t in range(2, self.T + 1)]
        return torch.stack(terms, 0).sum(0)  # (B,)

    @torch.no_grad()
    def nll(self, x: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 256) -> NLL:
        """The ELBO of the chain per sequence in bits per token, kind "elbo": an unbiased single-sample
        estimate (one forward-chain draw x_2..x_T per sequence, elbo_per_sequence). For T = 2 no noise
        enters (the one scale ignores x_2): the exact AR likelihood, kind "exact"."""
        with eval_mode(self):
            per_seq = torch.cat([self.elbo_per_sequence(x[i:i + chunk], generator)
                                 for i in range(0, x.shape[0], chunk)])  # (B,)
        bits = (per_seq.double() / (self.seq_len * LN2)).cpu()  # (B,) bits per token
        return NLL(per_sequence=bits, kind="exact" if self.T == 2 else "elbo")

    # ---- sampling -----------------------------------------------------------------------------
    def _draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One id per row from (n, V) logits with the configured temperature / top-k / top-p. -> (n,)"""
        c = self.sample_cfg
        dev = _generator_device(generator, logits.device)  # multinomial needs the generator's device
        return sample_logits(logits.to(dev), c.temperature, c.top_k, c.top_p, generator).to(logits.device)  # (n,)

    @torch.no_grad()
    def sample_scale(self, t: int, x_t: torch.Tensor, generator: torch.Generator | None = None,
                     keep_mask: torch.Tensor | None = None, forced: torch.Tensor | None = None,
                     use_cache: bool | None = None) -> torch.Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t), decoded in raster order. (n, L) -> (n, L)

        With keep_mask/forced, positions where keep_mask is True take the forced value instead of a draw
        and are fed to the decoder as context: the masked reverse process of Eq. 11 (A.3, ImageBART).
        Decoding stops after the last position any row must generate (later ones cannot influence it),
        and a leading run of forced positions is fed in one call.
        """
        with eval_mode(self):  # sampling never drops out (sample() and complete() are in eval mode already)
            return self._sample_scale(t, x_t, generator, keep_mask, forced, use_cache)

    def _sample_scale(self, t: int, x_t: torch.Tensor, generator: torch.Generator | None,
                      keep_mask: torch.Tensor | None, forced: torch.Tensor | None, use_cache: bool | None
                      ) -> torch.Tensor:
        model = self._scale(t)
        use_cache = self.sample_cfg.use_cache if use_cache is None else use_cache
        n, L = x_t.shape
        memory = model.encode(x_t)  # (n, L, D) or None: the encoder runs once per scale
        start = torch.full((n, 1), model.start_id, dtype=torch.long, device=x_t.device)
        out = torch.empty((n, L), dtype=torch.long, device=x_t.device)
        first, stop = 0, L
        if keep_mask is not None:
            span = generated_span(keep_mask, L)
            if span is None:
                return forced.clone()
            first, stop = span
            out[:, :first] = forced[:, :first]
            out[:, stop:] = forced[:, stop:]
        cache = model.decoder.new_cache() if use_cache else None
        # The likelihood residual of every position, once: a cached step then adds its row instead of rebuilding
        # it (one-hot, scale, log over (n, V)) per token.
        table = model.residual_table(x_t, model.decoder.head.weight.dtype) if use_cache else None
        compiled_step = self.compile_mode == "on"
        step = compiled(self._decode_logits) if compiled_step else self._decode_logits
        # The cached loop's steps are too small for several CPU threads (the encoder pass above is not).
        with decode_threads(x_t.device) if use_cache else contextlib.nullcontext():
            tok = None  # the token of position i - 1, fed to the cached step at position i
            for i in range(first, stop):
                if not use_cache:
                    h = model.decoder(torch.cat([start, out[:, :i]], dim=1), memory=memory)[:, -1:]  # (n, 1, V)
                    logits = model.output_logits(h, x_t[:, i:i + 1])[:, 0]  # (n, V)
                elif i == first:
                    # Prefill: the start id and the forced prefix in one call, which also projects the memory once.
                    prefix = torch.cat([start, out[:, :first]], dim=1)  # (n, first + 1)
                    h = model.decoder(prefix, memory=memory, cache=cache)[:, -1:]  # (n, 1, V)
                    logits = model.output_logits(h, x_t[:, i:i + 1])[:, 0]  # (n, V)
                    positions = cache.layers[0].positions  # arange(L) on the device: the static step's positions
                else:
                    # Only the new position goes through the cached decoder; the compiled step takes its position
                    # as a tensor (one graph for every step), the eager one as an int.
                    pos = positions[i:i + 1] if compiled_step else i
                    logits = step(model, tok[:, None], cache, pos, table)  # (n, V)
                tok = self._draw(logits, generator)  # (n,)
                if keep_mask is not None:
                    tok = torch.where(keep_mask[:, i], forced[:, i], tok)
                out[:, i] = tok
        return out

    @staticmethod
    def _decode_logits(model: ScaleModel, tok: torch.Tensor, cache: KVCache, pos: int | torch.Tensor,
                       table: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Logits (n, V) of x_{t-1} at position pos from the token before it (n, 1): one cached decoder step
        plus the likelihood residual of x_t there (table: ScaleModel.residual_table, or None without one).
        pos: int or (1,) tensor (Transformer.decode)."""
        logits = model.decoder.decode(tok, cache, pos)[:, 0]  # (n, V)
        if table is None:
            return logits
        scale, residual = table
        # output_logits' arithmetic (logits * exp(s) + residual) in its order, on the precomputed operands.
        row = residual[:, pos] if isinstance(pos, int) else residual[:, pos][:, 0]  # (n, V)
        return logits.to(scale.dtype) * scale + row


    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T uniform over V, then x_{t-1} ~ p(x_{t-1} | x_t) for t = T..2 (ImageBART Sec. 3.3). -> (n, L)"""
        dev = self.device
        with eval_mode(self):
            x = torch.randint(0, self.vocab_size, (n, self.seq_len), generator=generator,
                              device=_generator_device(generator, dev)).to(dev)  # (n, L) x_T
            for t in range(self.T, 1, -1):
                x = self.sample_scale(t, x, generator)
        return x

    def sample_flops(self, use_cache: bool | None = None) -> int:
        """Model FLOPs of one image of sample() (priors/flops.py): per scale, the encoder's one bidirectional
        pass over x_t (scales t < T) and L decoder calls cross-attending to its L memory tokens.
        use_cache None = the configured `sample.use_cache`."""
        use_cache = self.sample_cfg.use_cache if use_cache is None else use_cache
        total, L = 0, self.seq_len
        for t in range(2, self.T + 1):
            model = self._scale(t)
            memory = 0 if model.encoder is None else L
            if model.encoder is not None:
                total += encoder_flops(model.encoder.cfg, L)
            total += decoder_sample_flops(model.decoder.cfg, L, use_cache, memory)
        return total

    def nfe(self) -> int:
        """Network calls of one sample(): L decoder calls per scale (one per generated position, with or
        without the KV cache) for the T - 1 scales, plus one encoder pass for each of the T - 2
        encoder-decoder scales: (T - 1) * L + (T - 2). complete() is counted by completion_nfe."""
        return (self.T - 1) * self.seq_len + (self.T - 2)

    def completion_nfe(self, keep_mask: torch.Tensor) -> int:
        """Network calls of one complete(): each pass through a scale decodes the positions from the first
        to the last one any row generates (n calls) and runs its encoder once if it has one. The masked
        reverse chain passes through all T - 1 scales, (T - 1) n + (T - 2) calls (the Tab. 3 protocol);
        each of the `completion_passes` extra passes at t = 2 adds n + 1 (none for T = 2). 0 if n = 0."""
        span = generated_span(keep_mask, self.seq_len)
        if span is None:
            return 0
        n = span[1] - span[0]
        passes = self.sample_cfg.completion_passes if self.T > 2 else 0
        return (self.T - 1) * n + (self.T - 2) + passes * (n + 1)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, keep_mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Masked forward-backward process (ImageBART A.3, Eq. 10-12), m = ~keep_mask marks what to generate.

        1. Masked forward process (Eq. 10) from x_1 to x_T: kept entries are copied, masked entries follow
           q(x_T | x_1), which is uniform because beta_T = 1; so x_T = x_1 with noise on the masked entries.
        2. Masked reverse chain (Eq. 11) for t = T..2: x_{t-1} ~ p^{t-1,m}(x_{t-1} | x_t), i.e. the decoder
           samples masked entries and is teacher-forced with the kept ones (x_{t-1} = x_t = x_1 there).
           With the default `sample.completion_passes: 0` this one masked pass through the reverse chain
           is the whole completion: the protocol of the upper-half completion of Tab. 3.
        3. Optionally, `sample.completion_passes` extra forward-backward passes at t = 2 (Eq. 12, p^{1|1,m}):
           x_2 ~ q^{2,m}(x_2 | x_1) (masked entries redrawn with prob. beta_2), then x_1 ~ p^{1,m}(x_1 | x_2).
           For T = 2 the scale-2 model ignores x_2, so a pass would only draw an independent completion
           of the same distribution (the TT trajectory of Fig. 5); the passes are skipped there.
        Kept positions are never changed; with nothing to generate no network is called (completion_nfe).
        """
        keep = keep_mask.to(torch.bool)
        x = x.to(torch.long)
        if keep.all():
            return x.clone()
        V = self.vocab_size
        with eval_mode(self):
            noise = torch.randint(0, V, x.shape, generator=generator,
                                  device=_generator_device(generator, x.device)).to(x.device)
            x_t = torch.where(keep, x, noise)  # (B, L) x_T of the masked forward process
            for t in range(self.T, 1, -1):
                x_t = self.sample_scale(t, x_t, generator, keep_mask=keep, forced=x)
            if self.T > 2:
                for _ in range(self.sample_cfg.completion_passes):
                    x2 = torch.where(keep, x_t, q_sample_onestep(x_t, self.betas[2], V, generator))
                    x_t = self.sample_scale(2, x2, generator, keep_mask=keep, forced=x)
        return torch.where(keep, x, x_t)


def _plain(schedule: Any) -> Any:
    """The schedule option as plain str / dict of float lists (OmegaConf containers are not picklable
    everywhere), stored as given so that a checkpoint rebuilds exactly the same chain."""
    if isinstance(schedule, str):
        return schedule
    return {str(k): [float(v) for v in vals] for k, vals in schedule.items()}
