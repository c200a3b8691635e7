"""Taming Transformers' unconditional transformers (`Net2NetTransformer` checkpoints) as the project's AR prior.

A release is a Lightning checkpoint (`last.ckpt`) with its `project.yaml`. Its state dict holds the minGPT under
`transformer.*` and the first stage VQGAN under `first_stage_model.*`; an unconditional model has no conditioning
weights: it prepends the code id `sos_token` to every sequence (taming's SOSProvider), so the input is
[sos, z_0 .. z_{L-2}] and the output at i predicts z_i, the AR prior's factorisation with the start id inside the
codebook (ARPrior(start_id=sos)).

Its minGPT maps onto priors/transformer.py as releases/mingpt.py describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from bench.cache import file_sha256
from image_tokenizers.taming import (check_keys, config_from_taming_model, read_lightning_state_dict, read_yaml,
                               taming_vqgan_from_state_dict, vqgan_keys)
from image_tokenizers.vqmodel import VQModel
from priors.ar import ARPrior
from releases.mingpt import GPTShape, gpt_keys, project_state_dict

TARGET = "taming.models.cond_transformer.Net2NetTransformer"
GPT_TARGET = "taming.modules.transformer.mingpt.GPT"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"
# scripts/sample_fast.py's defaults, with which the repository's README reports its unconditional FIDs
PAPER_SAMPLING = {"temperature": 1.0, "top_k": 250, "top_p": 1.0}


@dataclass(frozen=True)
class TamingRelease:
    """A loaded release: the prior, its first stage, and where they came from."""
    prior: ARPrior
    tokenizer: VQModel
    source: str  # the checkpoint's file name
    sha256: str  # the checkpoint's sha256, hex
    paper_sampling: dict[str, Any]


def read_config(config_path: str, option: str) -> tuple[Any, GPTShape, int]:
    """(first-stage config node, minGPT shape, sos token) of an unconditional Net2NetTransformer project.yaml."""
    where = f"{option}={config_path}"
    model = read_yaml(config_path, option).get("model")
    target = None if model is None else model.get("target")
    if target != TARGET:
        raise ValueError(f"{where}: model.target={target} is not {TARGET} (not a Taming Transformers prior)")
    p = model.get("params") or {}
    if p.get("cond_stage_config") != "__is_unconditional__" and not p.get("unconditional", False):
        raise ValueError(f"{where}: a conditional model (cond_stage_config={p.get('cond_stage_config')}); "
                         "only unconditional releases are evaluated")
    permuter = (p.get("permuter_config") or {}).get("target", IDENTITY_PERMUTER)
    if permuter != IDENTITY_PERMUTER:
        raise ValueError(f"{where}: permuter_config.target={permuter}; only raster order ({IDENTITY_PERMUTER}) "
                         "matches the AR prior")
    gpt = p.get("transformer_config") or {}
    if gpt.get("target") != GPT_TARGET:
        raise ValueError(f"{where}: transformer_config.target={gpt.get('target')} is not {GPT_TARGET}")
    g = gpt.get("params") or {}
    if int(g.get("n_unmasked", 0)) != 0:
        raise ValueError(f"{where}: transformer_config.params.n_unmasked={g.get('n_unmasked')}: a conditioning "
                         "prefix the unconditional AR prior does not have")
    try:
        shape = GPTShape(int(g["vocab_size"]), int(g["block_size"]), int(g.get("n_layer", 12)),
                         int(g.get("n_head", 8)), int(g.get("n_embd", 256)))  # minGPT's GPT defaults
    except KeyError as e:
        raise ValueError(f"{where}: transformer_config.params has no {e.args[0]}") from None
    return p.get("first_stage_config"), shape, int(p.get("sos_token", 0))


def load(ckpt_path: str, config_path: str, option: str = "release") -> TamingRelease:
    """The release at ckpt_path/config_path as an ARPrior and its VQModel, both in eval mode on the CPU."""
    first_node, shape, sos = read_config(config_path, f"{option}.config")
    vq = config_from_taming_model(first_node, f"{option}.config={config_path} (first_stage_config)")
    where = f"{option}.config={config_path}"
    if shape.vocab_size != vq.n_embed:
        raise ValueError(f"{where}: transformer vocab_size={shape.vocab_size} differs from the first stage's "
                         f"n_embed={vq.n_embed}")
    if vq.remap is not None:
        raise ValueError(f"{where}: a first stage with remap={vq.remap}; released unconditional models have none")
    if not 0 <= sos < shape.vocab_size:
        raise ValueError(f"{where}: sos_token={sos} is not a code id in [0, {shape.vocab_size})")
    side = vq.resolution // 2 ** (len(vq.ch_mult) - 1)
    grid = (side, side)
    if shape.block_size < side * side:
        raise ValueError(f"{where}: block_size={shape.block_size} is shorter than the {side}x{side} token grid")

    ckpt = f"{option}.ckpt"
    sd = read_lightning_state_dict(ckpt_path, ckpt)
    mismatch = f"{ckpt}={ckpt_path} does not match {where}"
    sd = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.loss.")}  # LPIPS, discriminator
    expected = {f"first_stage_model.{k}": s for k, s in vqgan_keys(vq).items()} | gpt_keys(shape, "transformer.")
    check_keys(sd, expected, mismatch)
    first = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    tokenizer = taming_vqgan_from_state_dict(first, vq, mismatch)
    prior = ARPrior(shape.vocab_size, grid, n_layer=shape.n_layer, n_head=shape.n_head, d_model=shape.n_embd,
                    start_id=sos)
    prior.model.load_state_dict(project_state_dict(rest, shape, side * side, "transformer."))
    return TamingRelease(prior.eval(), tokenizer, Path(ckpt_path).name, file_sha256(Path(ckpt_path)),
                         dict(PAPER_SAMPLING))

