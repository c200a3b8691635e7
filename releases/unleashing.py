"""Unleashing Transformers' absorbing diffusion samplers (Bond-Taylor et al., ECCV 2022) as the project's absorbing
prior, with their own VQGAN.

A release is two bare state-dict files from the authors' `logs/` folder: the sampler's EMA weights
`logs/absorbing_<dataset>/saved_models/absorbing_ema_<step>.th` (the AbsorbingDiffusion module: its denoiser under
`_denoise_fn.*`, plus three (total_steps + 1,) training-statistics buffers `Lt_history`, `Lt_count`,
`loss_history`) and the VQGAN's `logs/vqgan_<dataset>/saved_models/vqgan_ema_<step>.th` (the autoencoder under
`ae.*`, the discriminator under `disc.*`, the LPIPS network under `perceptual.*`; only `ae.*` is used). No config
file ships with them: the sizes are the authors' per-dataset hyperparameter defaults (hparams/defaults/), given
here as RELEASE_HPARAMS and selected by dataset name, or read from a YAML file of the same keys.

The denoiser is a bidirectional minGPT (releases/mingpt.py) over codebook_size + 1 input ids, the last being the
absorbing mask (their mask_id = codebook_size), with codebook_size logits: exactly the project's AbsorbingPrior
(mask id V). Its `start_tok` parameter is used only by their autoregressive model and is checked and dropped.
Their diffusion has total_steps = N steps, equal to the number of tokens in every release; AbsorbingPrior uses
N = L, so a config where they differ is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.cache import file_sha256
from image_tokenizers.taming import check_keys, read_lightning_state_dict, read_yaml
from priors.absorbing import AbsorbingPrior
from releases.mingpt import GPTShape, gpt_keys, project_state_dict
from releases.unleashing_vqgan import UnleashingVQGAN, UnleashingVQGANConfig, autoencoder_keys

DENOISER = "_denoise_fn."
STAT_BUFFERS = ("Lt_history", "Lt_count", "loss_history")  # AbsorbingDiffusion's training statistics
VQGAN_PARTS = ("ae.", "disc.", "perceptual.")  # autoencoder, discriminator, LPIPS: what a vqgan_*.th holds

# hparams/defaults/vqgan_defaults.py and sampler_defaults.py: identical sizes for the three released datasets
# (ffhq, churches, bedrooms), all 256 x 256 images over a 16 x 16 grid of 1024 codes.
_RELEASE = {"sampler": "absorbing", "quantizer": "nearest", "n_channels": 3, "nf": 128, "emb_dim": 256,
            "codebook_size": 1024, "ch_mult": [1, 1, 2, 2, 4], "res_blocks": 2, "img_size": 256,
            "attn_resolutions": [16], "latent_shape": [1, 16, 16], "bert_n_emb": 512, "bert_n_head": 8,
            "bert_n_layers": 24, "block_size": 256, "total_steps": 256}
RELEASE_HPARAMS = {name: dict(_RELEASE, dataset=name) for name in ("ffhq", "churches", "bedrooms")}
REQUIRED = tuple(k for k in _RELEASE if k not in ("sampler", "quantizer"))

# experiments/calc_FID.py as the README runs it (--temp 0.9) with sampler_defaults.py's sample_steps = 256: one
# network call per token. Their sampler unmasks each masked token with probability 1/t at step t (random group
# sizes); the project's random sampler unmasks evenly sized random groups (see priors/absorbing.py).
PAPER_SAMPLING = {"sampler": "random", "T": 256, "temperature": 0.9}


@dataclass(frozen=True)
class UnleashingHparams:
    """What a release's sizes are: the VQGAN's config, the denoiser's minGPT shape and the diffusion's steps."""
    vqgan: UnleashingVQGANConfig
    gpt: GPTShape
    total_steps: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.vqgan.latent_side, self.vqgan.latent_side)


@dataclass(frozen=True)
class UnleashingRelease:
    """A loaded release: the prior, its first stage, and where they came from."""
    prior: AbsorbingPrior
    tokenizer: UnleashingVQGAN
    sources: tuple[str, str]  # the sampler's and the VQGAN's file names
    sha256: tuple[str, str]  # their sha256, hex
    paper_sampling: dict[str, Any]


def read_hparams(spec: str, option: str) -> UnleashingHparams:
    """A release's sizes: a dataset name of RELEASE_HPARAMS or a YAML file of the authors' H keys."""
    if spec in RELEASE_HPARAMS:
        h, where = RELEASE_HPARAMS[spec], f"{option}={spec}"
    else:
        where = f"{option}={spec}"
        if not Path(spec).is_file():
            raise ValueError(f"{where}: neither a released dataset ({', '.join(RELEASE_HPARAMS)}) nor a YAML file")
        node = read_yaml(spec, option)
        if not isinstance(node, DictConfig):
            raise ValueError(f"{where}: not a mapping of hyperparameters")
        h = OmegaConf.to_container(node)
    if h.get("sampler", "absorbing") != "absorbing":
        raise ValueError(f"{where}: sampler={h.get('sampler')} is not absorbing (not an absorbing diffusion release)")
    if h.get("quantizer", "nearest") != "nearest":
        raise ValueError(f"{where}: quantizer={h.get('quantizer')}; released VQGANs use the nearest-code quantizer")
    missing = [k for k in REQUIRED if k not in h]
    if missing:
        raise ValueError(f"{where}: no {missing[0]} (not Unleashing Transformers hyperparameters)")
    try:
        vq = UnleashingVQGANConfig(int(h["n_channels"]), int(h["nf"]), int(h["emb_dim"]), int(h["codebook_size"]),
                                   tuple(int(m) for m in h["ch_mult"]), int(h["res_blocks"]), int(h["img_size"]),
                                   tuple(int(r) for r in h["attn_resolutions"]))
        V, D = vq.codebook_size, int(h["bert_n_emb"])
        gpt = GPTShape(V + 1, int(h["block_size"]), int(h["bert_n_layers"]), int(h["bert_n_head"]), D, head_size=V)
        latent = [int(s) for s in h["latent_shape"]]
        total_steps = int(h["total_steps"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: a hyperparameter is not a number or list of numbers ({e})") from None
    side = vq.latent_side
    if latent != [1, side, side]:
        raise ValueError(f"{where}: latent_shape={latent} is not the VQGAN's [1, {side}, {side}]")
    if gpt.block_size < side * side:
        raise ValueError(f"{where}: block_size={gpt.block_size} is shorter than the {side}x{side} token grid")
    if total_steps != side * side:
        raise ValueError(f"{where}: total_steps={total_steps} differs from the {side * side} tokens; the absorbing "
                         "prior's diffusion has one step per token")
    return UnleashingHparams(vq, gpt, total_steps)


def sampler_keys(h: UnleashingHparams) -> dict[str, tuple[int, ...]]:
    """Every key and shape of an AbsorbingDiffusion state dict (absorbing_ema_<step>.th)."""
    keys = gpt_keys(h.gpt, DENOISER, causal=False)
    keys[DENOISER + "start_tok"] = (1, 1, h.gpt.n_embd)
    keys.update({name: (h.total_steps + 1,) for name in STAT_BUFFERS})
    return keys


def load(sampler_path: str, vqgan_path: str, hparams: str, option: str = "release") -> UnleashingRelease:
    """The release as an AbsorbingPrior and its UnleashingVQGAN, both in eval mode on the CPU; hparams is a
    released dataset's name (RELEASE_HPARAMS) or a YAML file of the authors' hyperparameters."""
    h = read_hparams(hparams, f"{option}.config")
    where = f"{option}.config={hparams}"

    s_opt, v_opt = f"{option}.ckpt", f"{option}.first_stage"
    sd = read_lightning_state_dict(sampler_path, s_opt)
    check_keys(sd, sampler_keys(h), f"{s_opt}={sampler_path} does not match {where}")
    vsd = read_lightning_state_dict(vqgan_path, v_opt)
    outside = sorted(k for k in vsd if not k.startswith(VQGAN_PARTS))
    if outside:  # e.g. a sampler file given as the VQGAN
        raise ValueError(f"{v_opt}={vqgan_path} does not match {where}: unexpected key {outside[0]}")
    ae = {k: v for k, v in vsd.items() if k.startswith("ae.")}
    check_keys(ae, {f"ae.{k}": s for k, s in autoencoder_keys(h.vqgan).items()},
               f"{v_opt}={vqgan_path} does not match {where}")
    ae = {k[len("ae."):]: v for k, v in ae.items()}

    tokenizer = UnleashingVQGAN(h.vqgan)
    tokenizer.load_state_dict(ae)
    V = h.vqgan.codebook_size
    prior = AbsorbingPrior(V, h.grid, n_layer=h.gpt.n_layer, n_head=h.gpt.n_head, d_model=h.gpt.n_embd)
    # the authors' mask_id = codebook_size is the prior's mask_id = V: the last row of the input embedding
    prior.model.load_state_dict(project_state_dict(sd, h.gpt, h.grid[0] * h.grid[1], DENOISER))
    return UnleashingRelease(prior.eval(), tokenizer.eval(), (Path(sampler_path).name, Path(vqgan_path).name),
                             (file_sha256(Path(sampler_path)), file_sha256(Path(vqgan_path))),
                             dict(PAPER_SAMPLING))

