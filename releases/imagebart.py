"""ImageBART's unconditional released chains as the project's ImageBART prior.

A release is one Lightning checkpoint and one config per scale (the repository's configs/sampling/*.yaml lists
them, scale 1 first). The official scale s (1 .. n_scales) models p(x_{s-1} | x_s) with x_0 the data; the
project's scale t = s + 1 models p(x_{t-1} | x_t) with x_1 the data, so T = n_scales + 1 and official beta_s is the
project's beta_{s+1}. Scales s < n_scales are `DenoisingXTransformer`s: an x-transformers encoder reads
[s, x_s] (the scale number as a code id in front), and its decoder reads [sos_token, x_{s-1} ..] and cross-attends
to all of it; with `ResidualScaledXTransformer` the logits are exp(log_scalors[s-1]) * logits +
log((1 - beta_s) e(x_s) + beta_s / V), the project's likelihood residual. The last scale is a
`DecoderOnlyDenoiser`: a minGPT reading [s, x_{s-1} ..], i.e. an AR model whose start id is the code id s.

These map onto the project's ScaleModel with its release options (priors/imagebart.py): start_id (the decoder's
start inside the codebook), enc_prefix (the scale number read in front of x_t), attn_dim (x-transformers' heads of
64 whatever the width), head_bias (its logits have a bias), and per-scale depths (scale_options). x-transformers'
attention has no q/k/v biases: the project's are loaded as zeros, which computes the same function. The release
samples with its EMA weights (`use_ema`, the `transformer_ema.*` copies): those are the ones loaded.

The first stage is a taming VQModel (`VQGANWrapper` adds a method, no weights) shrunk to the codes its data uses
by a `remap` list (data/vqgan_indices/*.npy, relative to the repository): the prior's ids are positions in that
list. Its weights are scale 1's `first_stage_model.*` (the official sampler builds the first stage from scale 1
alone), or, when that checkpoint carries none, the VQGAN checkpoint of the config's `ckpt_path` (vqgan.zip).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.cache import file_sha256
from image_tokenizers.taming import (TAMING_TARGETS, check_keys, config_from_taming_model, read_lightning_state_dict,
                               read_yaml, taming_vqgan_from_state_dict)
from image_tokenizers.vqmodel import VQGANConfig, VQModel
from priors.imagebart import ImageBARTPrior
from releases.mingpt import GPTShape, gpt_keys, project_state_dict

DIFFUSION = "imagebart.models.diffusion."
ENC_DEC, DEC_ONLY = DIFFUSION + "DenoisingXTransformer", DIFFUSION + "DecoderOnlyDenoiser"
XT = "imagebart.modules.xtransformers.x_transformer."
PLAIN_XT, RESIDUAL_XT = XT + "XTransformer", XT + "ResidualScaledXTransformer"
GPT_TARGET = "imagebart.modules.transformer.mingpt.GPT"
VQGAN_TARGET = "imagebart.models.vqgan.VQGANWrapper"  # taming's VQModel plus encode_to_prequant: the same weights
DEFAULT_DIM_HEAD = 64  # x-transformers' head size when a config sets no attn_dim_head
# XTransformer params a released unconditional scale may set; any other (rotary or relative positions, memory
# tokens, a channel-wise conditioning wrapper, ...) is an architecture the loader does not map.
XT_PARAMS = {"dim", "wrap_decoder", "tie_token_emb", "causal_decoder", "enc_num_tokens", "enc_depth", "enc_heads",
             "enc_max_seq_len", "enc_attn_dim_head", "dec_num_tokens", "dec_depth", "dec_heads", "dec_max_seq_len",
             "dec_attn_dim_head", "scale_pos", "n_scales", "xt_start", "xt_size"}
# scripts/sample_imagebart.py's defaults, the README's way to sample a release: temperature 1 at every scale and
# top-k equal to the codebook (no truncation); the encoder-decoder scales ignore the temperature it passes.
PAPER_SAMPLING = {"temperature": 1.0, "top_k": None, "top_p": 1.0}


@dataclass(frozen=True)
class ScaleSpec:
    """One released scale's config, as far as the prior needs it."""
    s: int  # the official scale number (1 = the data's transition)
    n_scales: int
    redraw_prob: Any  # the noise schedule, as the config names it
    vocab_size: int
    grid: tuple[int, int]
    use_ema: bool
    top_k: int | None
    sos_token: int
    # encoder-decoder scales
    dim: int = 0
    heads: int = 0
    dim_head: int = 0
    enc_depth: int = 0
    dec_depth: int = 0
    enc_len: int = 0
    dec_len: int = 0
    residual: bool = False
    # the decoder-only scale
    gpt: GPTShape | None = None


@dataclass(frozen=True)
class ImageBARTRelease:
    """A loaded chain: the prior, its first stage, and where they came from."""
    prior: ImageBARTPrior
    tokenizer: VQModel | None  # None when neither scale 1 nor a VQGAN checkpoint carries first-stage weights
    sources: list[str]  # the checkpoints' file names, scale 1 first
    sha256: list[str]
    paper_sampling: dict[str, Any]
    top_k: list[int | None]  # each config's top_k, scale 1 first
    first_stage_file: tuple[str, str] | None = None  # (name, sha256) of the VQGAN checkpoint, when not scale 1's


def _int(p: Any, key: str, where: str, default: Any = None) -> int:
    value = p.get(key, default)
    if value is None:
        raise ValueError(f"{where}: no {key}")
    return int(value)


def read_scale_config(config_path: str, option: str) -> ScaleSpec:
    """A released scale's config (model: DenoisingXTransformer or DecoderOnlyDenoiser) -> ScaleSpec."""
    where = f"{option}={config_path}"
    model = read_yaml(config_path, option).get("model")
    target = None if model is None else model.get("target")
    if target not in (ENC_DEC, DEC_ONLY):
        raise ValueError(f"{where}: model.target={target} is neither {ENC_DEC} nor {DEC_ONLY} "
                         "(not an ImageBART scale)")
    p = model.get("params") or {}
    if p.get("conditioner_config") is not None:
        raise ValueError(f"{where}: a class-conditional scale (conditioner_config); only unconditional releases "
                         "are evaluated")
    n_scales = _int(p, "n_scales", where)
    s = _int(p, "single_scale", where)
    if not 1 <= s <= n_scales:
        raise ValueError(f"{where}: single_scale={s} is not a scale of n_scales={n_scales}")
    if (target == DEC_ONLY) != (s == n_scales):
        raise ValueError(f"{where}: scale {s} of {n_scales} is a {target.rsplit('.', 1)[1]}; released chains "
                         "have a decoder-only last scale and encoder-decoder scales below it")
    if p.get("redraw_prob") is None:
        raise ValueError(f"{where}: no redraw_prob (the noise schedule)")
    first = (p.get("first_stage_config") or {}).get("params") or {}
    dd = first.get("ddconfig") or {}
    try:
        side = int(dd["resolution"]) // 2 ** (len(dd["ch_mult"]) - 1)
    except (KeyError, TypeError):
        raise ValueError(f"{where}: first_stage_config.params.ddconfig has no resolution/ch_mult "
                         "(the token grid)") from None
    top_k = p.get("top_k")
    common = dict(s=s, n_scales=n_scales, redraw_prob=p.get("redraw_prob"), grid=(side, side),
                  use_ema=bool(p.get("use_ema", False)), top_k=None if top_k is None else int(top_k),
                  sos_token=int(p.get("sos_token", 0)))
    L = side * side
    tc = p.get("transformer_config") or {}
    t = tc.get("params") or {}
    if target == DEC_ONLY:
        if tc.get("target") != GPT_TARGET:
            raise ValueError(f"{where}: transformer_config.target={tc.get('target')} is not {GPT_TARGET}")
        if int(t.get("n_unmasked", 0)) != 0:
            raise ValueError(f"{where}: transformer_config.params.n_unmasked={t.get('n_unmasked')}: a "
                             "conditioning prefix the decoder-only scale does not have")
        V = _int(t, "vocab_size", where)
        if int(t.get("input_vocab_size") or V) != V:
            raise ValueError(f"{where}: input_vocab_size={t.get('input_vocab_size')} differs from vocab_size={V}")
        gpt = GPTShape(V, _int(t, "block_size", where), int(t.get("n_layer", 12)), int(t.get("n_head", 8)),
                       int(t.get("n_embd", 256)))  # minGPT's GPT defaults
        if gpt.block_size < L:
            raise ValueError(f"{where}: block_size={gpt.block_size} is shorter than the {side}x{side} token grid")
        if not 0 <= s < V:
            raise ValueError(f"{where}: the start id (the scale number {s}) is not a code id in [0, {V})")
        return ScaleSpec(vocab_size=V, gpt=gpt, **common)
    if tc.get("target") not in (PLAIN_XT, RESIDUAL_XT):
        raise ValueError(f"{where}: transformer_config.target={tc.get('target')} is neither {PLAIN_XT} nor "
                         f"{RESIDUAL_XT}")
    unknown = sorted(set(t) - XT_PARAMS)
    if unknown:
        raise ValueError(f"{where}: transformer_config.params.{unknown[0]} is an x-transformers option the "
                         "loader does not map")
    for key, value in (("wrap_decoder", False), ("tie_token_emb", False), ("causal_decoder", True)):
        if bool(t.get(key, value)) != value:
            raise ValueError(f"{where}: transformer_config.params.{key}={t.get(key)}; released scales have {value}")
    residual = tc.get("target") == RESIDUAL_XT
    V = _int(t, "dec_num_tokens", where)
    spec = ScaleSpec(vocab_size=V, dim=_int(t, "dim", where), heads=_int(t, "dec_heads", where),
                     dim_head=int(t.get("dec_attn_dim_head", DEFAULT_DIM_HEAD)), enc_depth=_int(t, "enc_depth", where),
                     dec_depth=_int(t, "dec_depth", where), enc_len=_int(t, "enc_max_seq_len", where),
                     dec_len=_int(t, "dec_max_seq_len", where), residual=residual, **common)
    same = {"enc_num_tokens": V, "enc_heads": spec.heads, "enc_attn_dim_head": spec.dim_head}
    for key, value in same.items():
        if int(t.get(key, DEFAULT_DIM_HEAD if "dim_head" in key else None) or 0) != value:
            raise ValueError(f"{where}: transformer_config.params.{key}={t.get(key)} differs from the decoder's "
                             f"{value}")
    if spec.enc_len < L + 1 or spec.dec_len < L:
        raise ValueError(f"{where}: enc_max_seq_len={spec.enc_len} / dec_max_seq_len={spec.dec_len} are shorter "
                         f"than the scale number and the {side}x{side} grid ({L + 1} / {L})")
    if residual:
        layout = {"scale_pos": 0, "xt_start": 1, "xt_size": L, "n_scales": n_scales}
        for key, value in layout.items():
            if _int(t, key, where) != value:
                raise ValueError(f"{where}: transformer_config.params.{key}={t.get(key)}; the encoder reads "
                                 f"[scale, x_s] of {L} codes, so {key} must be {value}")
    if not 0 <= s < V or not 0 <= spec.sos_token < V:
        raise ValueError(f"{where}: the scale number {s} and sos_token={spec.sos_token} must be code ids in "
                         f"[0, {V})")
    return spec


# ---- noise schedule -------------------------------------------------------------------------------------------------
class _TableUnpickler(pickle.Unpickler):
    """The schedule tables are pickled dicts of lists of numpy floats: nothing else is let in."""
    ALLOWED = {("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a schedule table")
        return super().find_class(module, name)


def _first_crossing(x: np.ndarray, y: np.ndarray) -> float | None:
    """The smallest-index x where the piecewise-linear y(x) crosses 0 (a sample at 0 counts), or None."""
    sign = np.sign(y)
    for i in range(len(y) - 1):
        if sign[i] != sign[i + 1]:
            if y[i] == 0:
                return float(x[i])
            # linear interpolation between the two samples: the root sits |y_i| / (|y_i| + |y_i+1|) of the way
            return float(x[i] + (x[i + 1] - x[i]) / (abs(y[i + 1] / y[i]) + 1))
    return None


def table_betas(table_path: str, dist: str, metric: str, n_steps: int, where: str) -> list[float]:
    """The schedule whose steps are equally spaced in `metric` (the paper's Sec. 4.1 custom schedules): the
    table holds, for `dist`, a metric of the noisy reconstructions at a grid of alpha_bar values; the alpha_bar
    where the metric crosses each of n_steps equally spaced levels gives beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.
    Returns beta_0 .. beta_{n_steps-1} in float32 (beta_0 = 0), as the official chain holds them."""
    if not Path(table_path).is_file():
        raise FileNotFoundError(f"{where}: the schedule table {table_path} is not there (the repository's data/ "
                                "folder holds it)")
    try:
        with open(table_path, "rb") as f:
            data = _TableUnpickler(f).load()
        alpha_bar = np.array(data[dist]["alphacum"], dtype=np.float64)
        values = np.array(data[dist][metric], dtype=np.float64)[:, 0]
    except (pickle.UnpicklingError, KeyError, TypeError, IndexError, ValueError, EOFError) as e:
        raise ValueError(f"{where}: the schedule table {table_path} has no {dist}/{metric} curve ({e})") from None
    roots = []
    for level in np.linspace(values.min(), values.max(), n_steps):
        root = _first_crossing(alpha_bar, values - level)
        if root is None:
            raise ValueError(f"{where}: {metric} never reaches {level} in {table_path}")
        roots.append(root)
    r = np.array(roots)
    return [0.0] + (1 - r[1:] / r[:-1]).astype(np.float32).tolist()


def official_betas(redraw_prob: Any, n_scales: int, data_dir: str | None, where: str) -> list[float]:
    """beta_s for s = 1 .. n_scales of a config's redraw_prob, float32 as the official chain holds them."""
    if redraw_prob == "geometric":  # beta_s = 1 / (n_scales - s + 1): alpha_bar linear in s
        betas = (1.0 / torch.arange(n_scales, 0, -1, dtype=torch.float32)).tolist()
    elif isinstance(redraw_prob, str) and redraw_prob.startswith("alphacum:"):
        a = [float(v) for v in redraw_prob[len("alphacum:"):].split(",")]
        betas = torch.tensor([1 - at / atmo for at, atmo in zip(a[1:], a[:-1])], dtype=torch.float32).tolist()
    elif isinstance(redraw_prob, str):  # "<data>_<dist>_<metric>" or "<dist>_<metric>" (data = in, ImageNet)
        parts = redraw_prob.split("_")
        if len(parts) not in (2, 3):
            raise ValueError(f"{where}: redraw_prob={redraw_prob} is not a schedule name (geometric, "
                             "alphacum:..., [<data>_]<dist>_<metric>)")
        dset, dist, metric = parts if len(parts) == 3 else ["in", *parts]
        if data_dir is None:
            raise ValueError(f"{where}: redraw_prob={redraw_prob} reads data/{dset}_schedule_vs_metric.p: give "
                             "the repository's folder (release.root), whose data/ holds it")
        betas = table_betas(str(Path(data_dir) / f"{dset}_schedule_vs_metric.p"), dist, metric, n_scales + 1,
                            where)[1:]
    else:
        raise ValueError(f"{where}: redraw_prob={redraw_prob}: a constant redraw probability never reaches pure "
                         "noise (beta = 1), which the chain's last scale assumes")
    if len(betas) != n_scales or betas[-1] != 1.0:
        raise ValueError(f"{where}: redraw_prob={redraw_prob} gives betas {betas}; the last must be 1 (x_T noise)")
    return betas


# ---- keys and weights -----------------------------------------------------------------------------------------------
def _layer_types(spec: ScaleSpec, part: str) -> list[str]:
    return ["a", "f"] * spec.enc_depth if part == "encoder" else ["a", "c", "f"] * spec.dec_depth


def xt_keys(spec: ScaleSpec, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a released XTransformer under `prefix` (encoder, decoder, then log_scalors)."""
    D, A, V = spec.dim, spec.heads * spec.dim_head, spec.vocab_size
    keys: dict[str, tuple[int, ...]] = {}
    for part, n in (("encoder", spec.enc_len), ("decoder", spec.dec_len)):
        p = f"{prefix}{part}."
        keys.update({p + "token_emb.weight": (V, D), p + "pos_emb.emb.weight": (n, D)})
        for j, kind in enumerate(_layer_types(spec, part)):
            q = f"{p}attn_layers.layers.{j}."
            keys.update({q + "0.weight": (D,), q + "0.bias": (D,)})
            if kind == "f":
                keys.update({q + "1.net.0.0.weight": (4 * D, D), q + "1.net.0.0.bias": (4 * D,),
                             q + "1.net.2.weight": (D, 4 * D), q + "1.net.2.bias": (D,)})
            else:
                keys.update({q + "1.to_q.weight": (A, D), q + "1.to_k.weight": (A, D), q + "1.to_v.weight": (A, D),
                             q + "1.to_out.weight": (D, A), q + "1.to_out.bias": (D,)})
        keys.update({p + "norm.weight": (D,), p + "norm.bias": (D,), p + "to_logits.weight": (V, D),
                     p + "to_logits.bias": (V,)})
    if spec.residual:
        keys[prefix + "log_scalors"] = (spec.n_scales,)
    return keys


def scale_keys(spec: ScaleSpec) -> dict[str, tuple[int, ...]]:
    """A released scale's state-dict keys but its first stage's: transformer, its EMA copy, the chain's buffers."""
    if spec.gpt is not None:
        net = gpt_keys(spec.gpt, "transformer.")
    else:
        net = xt_keys(spec, "transformer.")
    keys = {"sos_token": (1,), "alphats": (spec.n_scales + 1,), "alphacum": (spec.n_scales + 1,)} | net
    if spec.use_ema:  # LitEma: one buffer per parameter, named without its dots, plus decay and update count
        keys |= {"transformer_ema.decay": (), "transformer_ema.num_updates": ()}
        keys |= {"transformer_ema." + k[len("transformer."):].replace(".", ""): s for k, s in net.items()
                 if not k.endswith("attn.mask")}
    return keys


def _weights(sd: dict[str, torch.Tensor], spec: ScaleSpec) -> dict[str, torch.Tensor]:
    """transformer.* of a checked state dict, with the EMA copies in place of the live weights when the release
    samples with them. Keys without the `transformer.` prefix."""
    net = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    if spec.use_ema:
        net = {k: v if k.endswith("attn.mask") else sd["transformer_ema." + k.replace(".", "")]
               for k, v in net.items()}
    return net


def xt_state_dict(w: dict[str, torch.Tensor], spec: ScaleSpec, L: int) -> dict[str, torch.Tensor]:
    """An XTransformer's weights under the project ScaleModel's names (encoder reads L + 1 positions)."""
    out: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:  # a Linear or LayerNorm: weight and bias
        out[dst + ".weight"], out[dst + ".bias"] = w[src + ".weight"], w[src + ".bias"]

    for part, positions in (("encoder", L + 1), ("decoder", L)):
        p = f"{part}."
        out[p + "tok_emb.weight"] = w[p + "token_emb.weight"]
        out[p + "pos_emb.weight"] = w[p + "pos_emb.emb.weight"][:positions]
        per_block = 2 if part == "encoder" else 3  # (self-attention, [cross-attention,] feed-forward)
        for j, kind in enumerate(_layer_types(spec, part)):
            src, dst = f"{p}attn_layers.layers.{j}.", f"{p}blocks.{j // per_block}."
            linear(dst + {"a": "ln_attn", "c": "ln_cross", "f": "ln_mlp"}[kind], src + "0")
            if kind == "f":
                linear(dst + "mlp.fc", src + "1.net.0.0")
                linear(dst + "mlp.proj", src + "1.net.2")
                continue
            q, k, v = (w[f"{src}1.to_{name}.weight"] for name in "qkv")
            zeros = q.new_zeros(q.shape[0])  # x-transformers' q/k/v have no biases: the project's are zero
            if kind == "a":  # the project's qkv stacks (q, k, v)
                out[dst + "attn.qkv.weight"], out[dst + "attn.qkv.bias"] = torch.cat([q, k, v]), zeros.repeat(3)
            else:
                out[dst + "cross.q.weight"], out[dst + "cross.q.bias"] = q, zeros
                out[dst + "cross.kv.weight"], out[dst + "cross.kv.bias"] = torch.cat([k, v]), zeros.repeat(2)
            linear(dst + ("attn" if kind == "a" else "cross") + ".proj", src + "1.to_out")
        linear(p + "ln_f", p + "norm")
    linear("decoder.head", "decoder.to_logits")
    if spec.residual:
        out["log_scale"] = w["log_scalors"][spec.s - 1]  # the scale's own entry of the per-scale vector
    return out


# ---- the first stage -----------------------------------------------------------------------------------------------
def first_stage_config(config_path: str, root: str | None, option: str) -> tuple[VQGANConfig, str | None]:
    """(VQGANConfig, ckpt_path) of a scale config's first_stage_config; remap and ckpt_path resolved against root
    (the repository's folder, where the releases' relative paths start)."""
    where = f"{option}={config_path} (first_stage_config)"
    node = read_yaml(config_path, option).model.params.get("first_stage_config")
    target = None if node is None else node.get("target")
    if target not in (VQGAN_TARGET, *TAMING_TARGETS):
        raise ValueError(f"{where}: target={target} is not {VQGAN_TARGET}")
    node = node.copy()
    node.target = TAMING_TARGETS[0]
    cfg = config_from_taming_model(node, where)
    base = Path(root) if root is not None else Path(config_path).parent
    if cfg.remap is not None:
        remap = cfg.remap if Path(cfg.remap).is_absolute() else str(base / cfg.remap)
        if not Path(remap).is_file():
            raise FileNotFoundError(f"{where}: remap={cfg.remap}: {remap} not found (the repository's "
                                    "data/vqgan_indices/; give its folder as root)")
        cfg = replace(cfg, remap=remap)
    ckpt = node.params.get("ckpt_path")
    return cfg, None if ckpt is None else (ckpt if Path(ckpt).is_absolute() else str(base / ckpt))


def load_first_stage(sd: dict[str, torch.Tensor], cfg: VQGANConfig, vqgan_ckpt: str | None, vocab_size: int,
                     where: str) -> tuple[VQModel | None, tuple[str, str] | None]:
    """The first stage from scale 1's state dict sd, else from vqgan_ckpt, with the (name, sha256) of the file
    it came from when that is vqgan_ckpt; (None, None) when neither has one."""
    first = {k[len("first_stage_model."):]: v for k, v in sd.items()
             if k.startswith("first_stage_model.") and not k.startswith("first_stage_model.loss.")}
    source = None
    if first:
        tokenizer = taming_vqgan_from_state_dict(first, cfg, f"{where} (first_stage_model)")
    elif vqgan_ckpt is not None and Path(vqgan_ckpt).is_file():
        vq = read_lightning_state_dict(vqgan_ckpt, f"{where}: first stage {vqgan_ckpt}")
        vq = {k: v for k, v in vq.items() if not k.startswith("loss.")}  # LPIPS, discriminator
        tokenizer = taming_vqgan_from_state_dict(vq, cfg, f"first stage {vqgan_ckpt}")
        source = (Path(vqgan_ckpt).name, file_sha256(Path(vqgan_ckpt)))
    else:
        return None, None
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{where}: the first stage has {tokenizer.vocab_size} codes (after remap), the scales "
                         f"{vocab_size}")
    return tokenizer, source


# ---- the chain ------------------------------------------------------------------------------------------------------
def read_chain(config_paths: list[str], option: str, data_dir: str | None = None
               ) -> tuple[list[ScaleSpec], list[float]]:
    """The scales' specs (scale 1 first) and the schedule's betas beta_1 .. beta_n, checked as one chain."""
    if not config_paths:
        raise ValueError(f"{option}.config is empty: a release lists one config per scale")
    specs = [read_scale_config(p, f"{option}.config[{i}]") for i, p in enumerate(config_paths)]
    first, n = specs[0], len(specs)
    for i, spec in enumerate(specs):
        where = f"{option}.config[{i}]={config_paths[i]}"
        if spec.n_scales != n or spec.s != i + 1:
            raise ValueError(f"{where}: scale {spec.s} of n_scales={spec.n_scales}, but it is entry {i} of {n} "
                             "(list the scales in order, scale 1 first)")
        for field in ("redraw_prob", "vocab_size", "grid"):
            if getattr(spec, field) != getattr(first, field):
                raise ValueError(f"{where}: {field}={getattr(spec, field)} differs from scale 1's "
                                 f"{getattr(first, field)}")
        heads = spec.gpt.n_head if spec.gpt is not None else spec.heads
        if heads != (first.gpt.n_head if first.gpt is not None else first.heads):
            raise ValueError(f"{where}: {heads} attention heads; the project's chain has one head count")
        if spec.gpt is None and spec.residual != first.residual:
            raise ValueError(f"{where}: residual-scaled logits in some encoder-decoder scales only")
    betas = official_betas(first.redraw_prob, n, data_dir, f"{option}.config[0]={config_paths[0]}")
    return specs, betas


def prior_from_specs(specs: list[ScaleSpec], betas: list[float]) -> ImageBARTPrior:
    """The project's ImageBART prior with the released chain's architecture (untrained weights)."""
    first, last = specs[0], specs[-1]
    options, widths = [], []
    for spec in specs:
        if spec.gpt is not None:
            options.append({"n_enc_layer": 0, "n_dec_layer": spec.gpt.n_layer, "start_id": spec.s})
            widths.append(spec.gpt.n_embd)
        else:
            options.append({"n_enc_layer": spec.enc_depth, "n_dec_layer": spec.dec_depth, "start_id": spec.sos_token,
                            "enc_prefix": spec.s, "attn_dim": spec.heads * spec.dim_head, "head_bias": True})
            widths.append(spec.dim)
    # n_layer / n_enc_layer only have to be a valid split here: scale_options set every scale's depths
    n_layer = first.enc_depth + first.dec_depth if first.gpt is None else last.gpt.n_layer
    n_enc = first.enc_depth if first.gpt is None else None
    return ImageBARTPrior(first.vocab_size, first.grid, T=len(specs) + 1, n_layer=n_layer,
                          n_head=last.gpt.n_head, d_model=widths, n_enc_layer=n_enc,
                          schedule={"betas": betas}, likelihood_residual=first.residual,
                          scale_options=options, sample=dict(PAPER_SAMPLING))


def load(ckpt_paths: list[str], config_paths: list[str], root: str | None = None, data_dir: str | None = None,
         vqgan_ckpt: str | None = None, option: str = "release") -> ImageBARTRelease:
    """The chain of per-scale checkpoints/configs (scale 1 first) as an ImageBARTPrior in eval mode on the CPU,
    with its first stage. root: the repository's folder, against which the configs' relative paths (remap lists,
    the VQGAN's ckpt_path) resolve (default: scale 1's config's folder); data_dir: its data/ folder, for schedules
    read from its metric tables (default root/data); vqgan_ckpt: the first stage's checkpoint when scale 1 holds
    none (default: the config's ckpt_path)."""
    if len(ckpt_paths) != len(config_paths):
        raise ValueError(f"{option}: {len(ckpt_paths)} checkpoints for {len(config_paths)} configs (one per scale)")
    if data_dir is None and root is not None:
        data_dir = str(Path(root) / "data")
    specs, betas = read_chain(config_paths, option, data_dir)
    vq_cfg, vq_ckpt = first_stage_config(config_paths[0], root, f"{option}.config[0]")
    prior = prior_from_specs(specs, betas)
    L = specs[0].grid[0] * specs[0].grid[1]
    tokenizer = first_file = None
    for i, (spec, path) in enumerate(zip(specs, ckpt_paths)):
        ckpt = f"{option}.ckpt[{i}]"
        full = read_lightning_state_dict(path, ckpt)
        sd = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}  # scales > 1: unused copies
        check_keys(sd, scale_keys(spec), f"{ckpt}={path} does not match {option}.config[{i}]={config_paths[i]}")
        if i == 0:
            tokenizer, first_file = load_first_stage(full, vq_cfg, vqgan_ckpt or vq_ckpt, spec.vocab_size,
                                                     f"{ckpt}={path}")
        w = _weights(sd, spec)
        if spec.gpt is not None:
            weights = {"decoder." + k: v for k, v in project_state_dict(w, spec.gpt, L, "").items()}
        else:
            weights = xt_state_dict(w, spec, L)
        prior.scales[f"scale{spec.s + 1}"].load_state_dict(weights)
    sha = [file_sha256(Path(p)) for p in ckpt_paths]
    return ImageBARTRelease(prior.eval(), tokenizer, [Path(p).name for p in ckpt_paths], sha,
                            dict(PAPER_SAMPLING), [s.top_k for s in specs], first_file)


def load_sampling_config(path: str, root: str | None = None, data_dir: str | None = None,
                         option: str = "release") -> ImageBARTRelease:
    """A configs/sampling/*.yaml (checkpoints: [...], configs: [...]), its paths relative to root (default: the
    folder of path), as load()."""
    node = read_yaml(path, f"{option}.config")
    base = Path(root) if root is not None else Path(path).parent
    ckpts, configs = node.get("checkpoints"), node.get("configs")
    if not ckpts or not configs:
        raise ValueError(f"{option}.config={path}: expected lists `checkpoints` and `configs` (one per scale)")
    return load([str(base / c) for c in ckpts], [str(base / c) for c in configs], str(base), data_dir,
                option=option)

