"""Parity fixtures for the release loaders, made by the official code itself.

Given a checkout of an official repository, build its model at a tiny configuration with random weights, save it
in the official on-disk format, and save its outputs on fixed inputs next to it. tests/ load those files with the
project's loaders and compare outputs, so a loader is checked against the official code without the released
weights (which these machines cannot download). The same script lists the full key names and shapes of a
release-sized configuration, built by the official modules on the meta device, so the loaders' expectations are
checked against what a released file holds.

    python tools/release_fixtures.py taming --checkout PATH/taming-transformers --out tests/fixtures/releases/taming
    python tools/release_fixtures.py unleashing --checkout PATH/unleashing-transformers \
        --out tests/fixtures/releases/unleashing
    python tools/release_fixtures.py imagebart --checkout PATH/imagebart --taming PATH/taming-transformers \
        --out tests/fixtures/releases/imagebart

With --e2e (and --out tests/fixtures/releases/FAMILY/e2e) it writes instead, per family, a model shaped for 256 x
256 images as the releases are: an f = 16 first stage (the narrowest channels the official modules allow, one
residual block per level) to a 16 x 16 grid of 32 codes under a one-layer, two-head, 16-wide transformer, in the
release's own file layout, with the official outputs on a fixed uint8 image and fixed codes. taming: last.ckpt
and project.yaml; unleashing: absorbing_ema_0.th, vqgan_ema_0.th and an hparams.yaml of the authors' names;
imagebart: the FFHQ 2-scale custom chain's layout (T = 3): scale1/2.ckpt and .yaml, sampling.yaml, the VQGAN
checkpoint the configs name (vqgan/vqgan-e2e.ckpt, 32 of its 40 codes in data/vqgan_indices/e2e_indices.npy)
and the FFHQ schedule table (data/). It has its own seed: the tiny fixtures regenerate byte-identical.

Running it needs the official code's own dependencies beside this project's (for taming-transformers:
pytorch-lightning 1.x with torchmetrics, tensorboardX, and transformers < 4.40 for an import in its minGPT;
install them with `pip install --target DIR` and put DIR on PYTHONPATH after the checkout). The official code was
written for torch 1.7: `torch._six`, which torch 2 removed, is recreated with the one name it imports.
ImageBART's models import `main.instantiate_from_config`; its own main.py pulls in data-augmentation packages the
models never use, so the taming-transformers checkout (ImageBART's first stage, which it needs anyway) goes first
on the path and its main.py, with the same function, is the one imported.

unleashing-transformers imports lpips and imageio (pip install --target DIR --no-deps lpips imageio) and, at
module level in utils/log_utils.py, the visdom client of its live plots, which nothing used here calls: an empty
`visdom` module stands in for it. Its models were written for a GPU (Generator puts its `logsigma` head on the
GPU in __init__): while the official modules are built, Module.cuda returns the module unchanged so they build on
the CPU.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch

SEED = 20261204

# A taming Net2NetTransformer small enough to commit (its GroupNorms need multiples of 32 channels): a 16 x 16 RGB VQGAN (f = 2, 8 x 8 grid of 32 codes) under an
# unconditional minGPT with its SOS token. Every structural feature of the released models is present: resnet
# blocks, mid and level attention, the asymmetric downsample, the codebook, separate q/k/v with biases, the causal
# mask buffer, learned positions, the bias-free head.
TINY_TAMING = {
    "model": {
        "base_learning_rate": 4.5e-06,
        "target": "taming.models.cond_transformer.Net2NetTransformer",
        "params": {
            "cond_stage_config": "__is_unconditional__",
            "unconditional": True,
            "sos_token": 0,
            "transformer_config": {
                "target": "taming.modules.transformer.mingpt.GPT",
                "params": {"vocab_size": 32, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 16},
            },
            "first_stage_config": {
                "target": "taming.models.vqgan.VQModel",
                "params": {
                    "embed_dim": 4, "n_embed": 32,
                    "ddconfig": {"double_z": False, "z_channels": 4, "resolution": 16, "in_channels": 3,
                                 "out_ch": 3, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1,
                                 "attn_resolutions": [8], "dropout": 0.0},
                    "lossconfig": {"target": "taming.modules.losses.DummyLoss"},
                },
            },
        },
    },
}


def release_shaped(tiny: dict, transformer: dict, first_stage: dict, grid: int) -> dict:
    """tiny's structure with a release's sizes: an unconditional model over a grid x grid token grid."""
    out = json.loads(json.dumps(tiny))
    p = out["model"]["params"]
    p["transformer_config"]["params"] = {**transformer, "block_size": grid * grid}
    p["first_stage_config"]["params"].update(first_stage)
    return out


# The released unconditional FFHQ/CelebA-HQ transformers are f = 16 models over a 16 x 16 grid of the 1024-code
# VQGAN; the sizes are those of the repository's configs/faceshq_transformer.yaml and faceshq_vqgan.yaml, the only
# published configuration of that family (the release's own project.yaml ships inside its download).
FACESHQ_VQGAN = {"embed_dim": 256, "n_embed": 1024,
                 "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3,
                              "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                              "attn_resolutions": [16], "dropout": 0.0}}
RELEASE_TAMING = release_shaped(TINY_TAMING, {"vocab_size": 1024, "n_layer": 24, "n_head": 16, "n_embd": 1024},
                                FACESHQ_VQGAN, grid=16)


def import_taming(checkout: Path) -> types.ModuleType:
    sys.path.insert(0, str(checkout))
    if "torch._six" not in sys.modules:
        six = types.ModuleType("torch._six")
        six.string_classes = (str, bytes)
        sys.modules["torch._six"] = six
    warnings.filterwarnings("ignore")
    import main  # the checkout's main.py: instantiate_from_config, as the official code builds models

    return main


def lightning_checkpoint(state_dict: dict) -> dict:
    """What PyTorch Lightning 1.x writes for a model saved before its first optimizer step."""
    import pytorch_lightning as pl

    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": pl.__version__, "state_dict": state_dict,
            "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}


def taming_fixtures(checkout: Path, out: Path) -> None:
    from omegaconf import OmegaConf

    main = import_taming(checkout)
    torch.manual_seed(SEED)
    config = OmegaConf.create(TINY_TAMING)
    model = main.instantiate_from_config(config.model).eval()
    # The official init leaves LayerNorms at (1, 0) and biases at 0: randomise every tensor so that a loader
    # which drops or swaps any of them (q/k/v order, ln1/ln2, a bias) gives other outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if name.endswith("ln1.weight")
                                                                            or name.endswith("ln2.weight")
                                                                            or name.endswith("ln_f.weight")
                                                                            else 0.0))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(lightning_checkpoint(model.state_dict()), out / "last.ckpt")
    OmegaConf.save(config, out / "project.yaml")

    g = torch.Generator().manual_seed(SEED + 1)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    grid = 8
    codes = torch.randint(0, 32, (3, grid * grid), generator=g)
    with torch.no_grad():
        logits, target = model(images, images)  # encode -> [sos, z_0 .. z_{L-2}] -> next-token logits
        sos = torch.full((3, 1), model.sos_token, dtype=torch.long)
        code_logits, _ = model.transformer(torch.cat([sos, codes[:, :-1]], dim=1))
        decoded = model.decode_to_img(codes, (3, 4, grid, grid))
    torch.save({"images": images, "encoded": target, "image_logits": logits, "codes": codes,
                "code_logits": code_logits, "decoded": decoded, "checkout_commit": commit_of(checkout)},
               out / "outputs.pt")
    write_keys(main, RELEASE_TAMING, out / "release_keys.json")
    print(f"wrote {out}/last.ckpt, project.yaml, outputs.pt, release_keys.json")


def write_keys(main: types.ModuleType, config: dict, path: Path) -> None:
    """Every state-dict key and shape of `config` as the official modules build it (on the meta device)."""
    from omegaconf import OmegaConf

    with torch.device("meta"):
        model = main.instantiate_from_config(OmegaConf.create(config).model)
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    path.write_text(json.dumps({"config": config, "keys": keys}, indent=1) + "\n")


# An Unleashing Transformers sampler and VQGAN small enough to commit, under the authors' hyperparameter names
# (their H): a 16 x 16 RGB VQGAN (f = 2, 8 x 8 grid of 32 codes, GroupNorms need multiples of 32 channels) under a
# bidirectional minGPT over 33 ids (32 codes + the mask). Every structural feature of the released models is
# present: residual blocks with and without a width change, level and non-local attention, the asymmetric
# downsample, the logsigma head, the codebook; separate q/k/v with biases, learned positions, the unused
# start_tok, the bias-free head; the discriminator's weights and BatchNorm statistics in the VQGAN file.
TINY_UNLEASHING = {"sampler": "absorbing", "quantizer": "nearest", "n_channels": 3, "nf": 32, "emb_dim": 4,
                   "codebook_size": 32, "ch_mult": [2, 1], "res_blocks": 1, "img_size": 16,
                   "attn_resolutions": [8], "latent_shape": [1, 8, 8], "bert_n_emb": 16, "bert_n_head": 2,
                   "bert_n_layers": 2, "block_size": 64, "total_steps": 64, "ndf": 8, "disc_layers": 2}
# Defaults the official modules read that do not change the weights' keys or shapes.
UNLEASHING_FIXED = {"beta": 0.25, "gumbel_straight_through": False, "gumbel_kl_weight": 1e-8, "attn_pdrop": 0.0,
                    "embd_pdrop": 0.0, "resid_pdrop": 0.0, "loss_type": "reweighted_elbo", "mask_schedule": "random",
                    "batch_size": 4, "n_samples": 4, "perceptual_weight": 1.0, "disc_start_step": 30001,
                    "disc_weight_max": 1, "diff_aug": False}


def import_unleashing(checkout: Path) -> types.ModuleType:
    sys.path.insert(0, str(checkout))
    sys.modules.setdefault("visdom", types.ModuleType("visdom"))
    warnings.filterwarnings("ignore")
    import models  # the checkout's models/ package

    return models


def unleashing_H(values: dict) -> object:
    """The authors' hyperparameter object H holding `values` over UNLEASHING_FIXED."""
    from hparams.defaults.base import HparamsBase

    H = HparamsBase(values.get("dataset", "custom"))
    for k, v in {**UNLEASHING_FIXED, **values}.items():
        H[k] = v
    return H


def on_cpu(build):
    """build() with Module.cuda a no-op (the official Generator moves a submodule to the GPU in __init__)."""
    cuda = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        return build()
    finally:
        torch.nn.Module.cuda = cuda


def unleashing_fixtures(checkout: Path, out: Path) -> None:
    import math

    import yaml

    models = import_unleashing(checkout)
    torch.manual_seed(SEED)
    H = unleashing_H(TINY_UNLEASHING)
    # VQGAN minus its LPIPS network (a pretrained VGG16, 58 MB in every released file, never used by a loader):
    # the file holds ae.* and disc.* as the authors' VQGAN.state_dict() names them.
    ae = on_cpu(lambda: models.VQAutoEncoder(H)).eval()
    disc = models.vqgan.Discriminator(H.n_channels, H.ndf, n_layers=H.disc_layers)
    codebook = ae.quantize.embedding.weight.detach().clone()
    denoiser = models.Transformer(H)
    sampler = models.AbsorbingDiffusion(H, denoiser, H.codebook_size, codebook).eval()
    # Official inits leave norms at (1, 0), biases at 0 and the codebook near 0: randomise every tensor so that a
    # loader which drops or swaps any of them gives other outputs.
    with torch.no_grad():
        for module in (ae, disc, sampler):
            for name, p in module.named_parameters():
                scale = 0.3 if p.dim() > 1 else 0.1
                p.copy_(torch.randn_like(p) * scale + (1.0 if "ln" in name.split(".")[-2] else 0.0))
        for name, b in sampler.named_buffers():
            b.copy_(torch.rand_like(b))
        codebook.copy_(ae.quantize.embedding.weight)
    out.mkdir(parents=True, exist_ok=True)
    vqgan_sd = ({f"ae.{k}": v for k, v in ae.state_dict().items()}
                | {f"disc.{k}": v for k, v in disc.state_dict().items()})
    torch.save(vqgan_sd, out / "vqgan_ema_0.th")  # utils/log_utils.save_model: a bare state dict
    torch.save(sampler.state_dict(), out / "absorbing_ema_0.th")
    (out / "hparams.yaml").write_text(yaml.safe_dump(TINY_UNLEASHING))

    g = torch.Generator().manual_seed(SEED + 1)
    B, L, V = 4, 64, H.codebook_size
    images = torch.rand(3, 3, 16, 16, generator=g)  # the authors' [0, 1] range
    codes = torch.randint(0, V, (B, L), generator=g)
    # masks at four rates: none, some, most, all (the first sampling step)
    rates = torch.tensor([0.0, 0.3, 0.8, 1.0]).unsqueeze(1)
    masked = torch.rand(B, L, generator=g) < rates
    x_t = codes.masked_fill(masked, H.codebook_size)
    losses = []
    with torch.no_grad():
        latents = ae.encoder(images)
        _, _, stats = ae.quantize(latents)
        encoded = stats["min_encoding_indices"].view(3, 8, 8)
        one_hot = torch.nn.functional.one_hot(codes.view(-1), V).float().view(B, L, V)
        q = sampler.embed(one_hot)  # what utils/sampler_utils.get_samples feeds the generator
        decoded = ae.generator(q)
        logits = sampler._denoise_fn(x_t)
        # the official training loss on each sequence, with its (t, mask) recovered by replaying its draws
        ts, masks = [], []
        for i in range(B):
            torch.manual_seed(SEED + 10 + i)
            loss, vb = sampler._train_loss(codes[i:i + 1])
            torch.manual_seed(SEED + 10 + i)
            t, _ = sampler.sample_time(1, "cpu")
            _, _, mask = sampler.q_sample(codes[i:i + 1], t)
            ts.append(t)
            masks.append(mask)
            losses.append(torch.stack([loss, vb]))
    torch.save({"images": images, "latents": latents, "encoded": encoded, "codes": codes, "decoded": decoded,
                "x_t": x_t, "logits": logits, "t": torch.cat(ts), "mask": torch.cat(masks),
                "train_loss": torch.stack(losses), "ln2": math.log(2), "checkout_commit": commit_of(checkout)},
               out / "outputs.pt")
    write_unleashing_keys(models, out / "release_keys.json")
    print(f"wrote {out}/absorbing_ema_0.th, vqgan_ema_0.th, hparams.yaml, outputs.pt, release_keys.json")


def write_unleashing_keys(models: types.ModuleType, path: Path) -> None:
    """Per released dataset, every key and shape of its sampler and VQGAN files, built by the official modules
    from the official per-dataset defaults (on the meta device; the VQGAN's LPIPS network with random VGG16
    weights, whose keys are those of the pretrained one)."""
    import lpips

    from hparams.defaults.sampler_defaults import HparamsAbsorbing
    from hparams.defaults.vqgan_defaults import HparamsVQGAN

    listed = {}
    make_lpips = lpips.LPIPS
    lpips.LPIPS = lambda *args, **kwargs: make_lpips(*args, **{**kwargs, "pnet_rand": True, "verbose": False})
    try:
        for dataset in ("ffhq", "churches", "bedrooms"):
            H = HparamsVQGAN(dataset)
            H.update(HparamsAbsorbing(dataset))
            H.sampler = "absorbing"
            H = unleashing_H(dict(H))
            with torch.device("meta"):
                vqgan = on_cpu(lambda: models.VQGAN(H))
                sampler = models.AbsorbingDiffusion(H, models.Transformer(H), H.codebook_size,
                                                    torch.zeros(H.codebook_size, H.emb_dim))
            hparams = {k: H[k] for k in ("n_channels", "nf", "emb_dim", "codebook_size", "ch_mult", "res_blocks",
                                         "img_size", "attn_resolutions", "latent_shape", "bert_n_emb",
                                         "bert_n_head", "bert_n_layers", "block_size", "total_steps", "quantizer",
                                         "sampler", "temp", "sample_steps")}
            listed[dataset] = {"hparams": hparams,
                               "sampler_keys": {k: list(v.shape) for k, v in sampler.state_dict().items()},
                               "vqgan_keys": {k: list(v.shape) for k, v in vqgan.state_dict().items()}}
    finally:
        lpips.LPIPS = make_lpips
    path.write_text(json.dumps(listed, indent=1) + "\n")


def commit_of(checkout: Path) -> str:
    """The checkout's commit, or why it is unknown (an exported tree has no .git; docs/releases.md then names it)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError as e:
        return f"unknown ({e.strerror})"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


# ---- ImageBART ---------------------------------------------------------------------------------------------------
# Two tiny released-format chains over a 4 x 4 grid of 16 codes, together covering every structural feature of the
# released ones: "geometric" (FFHQ 4 scales' layout: encoder-decoder scales with residual-scaled logits, the
# geometric schedule, a decoder-only last scale) and "custom" (LSUN's layout: a plain encoder-decoder scale whose
# encoder has more positions than it reads, a schedule read from the repository's metric table, a last scale with
# input_vocab_size). Attention heads of a fixed size (12) other than dim / heads, as in the releases (64 at 752).
IB_V, IB_SIDE = 16, 4
IB_L = IB_SIDE * IB_SIDE
IB_VQGAN = {
    "target": "imagebart.models.vqgan.VQGANWrapper",
    "params": {"sane_index_shape": True, "embed_dim": 4, "n_embed": IB_V,
               "ddconfig": {"double_z": False, "z_channels": 4, "resolution": IB_SIDE, "in_channels": 3,
                            "out_ch": 3, "ch": 32, "ch_mult": [1], "num_res_blocks": 0, "attn_resolutions": [],
                            "dropout": 0.0},
               "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}},
}
# The geometric chain's first stage is shrunk to its effective codebook like the releases': 24 codes, of which the
# 16 in the remap list are the prior's vocabulary (the path is relative to the chain's folder, as the releases'
# are relative to the repository).
IB_REMAP = "data/vqgan_indices/tiny_indices.npy"
IB_VQGAN_REMAP = {"target": IB_VQGAN["target"],
                  "params": {**IB_VQGAN["params"], "n_embed": 24, "remap": IB_REMAP}}


def ib_xtransformer(n_scales: int, residual: bool, enc_len: int) -> dict:
    params = {"wrap_decoder": False, "dim": 16, "enc_num_tokens": IB_V, "enc_depth": 2, "enc_heads": 2,
              "enc_attn_dim_head": 12, "enc_max_seq_len": enc_len, "dec_num_tokens": IB_V, "dec_depth": 1,
              "dec_heads": 2, "dec_attn_dim_head": 12, "tie_token_emb": False, "dec_max_seq_len": IB_L}
    if residual:
        return {"target": "imagebart.modules.xtransformers.x_transformer.ResidualScaledXTransformer",
                "params": {"scale_pos": 0, "n_scales": n_scales, "xt_start": 1, "xt_size": IB_L, **params}}
    return {"target": "imagebart.modules.xtransformers.x_transformer.XTransformer", "params": params}


def ib_gpt(input_vocab: bool) -> dict:
    params = {"vocab_size": IB_V, "block_size": IB_L, "n_layer": 2, "n_head": 2, "n_embd": 16}
    if input_vocab:
        params["input_vocab_size"] = IB_V
    return {"target": "imagebart.modules.transformer.mingpt.GPT", "params": params}


def ib_scale(s: int, n_scales: int, redraw_prob: str, transformer: dict, first_stage: dict) -> dict:
    last = s == n_scales
    return {"model": {
        "base_learning_rate": 0.0625,
        "target": "imagebart.models.diffusion." + ("DecoderOnlyDenoiser" if last else "DenoisingXTransformer"),
        "params": {"first_stage_key": "image", "monitor": "val/loss", "n_scales": n_scales, "single_scale": s,
                   "top_k": IB_V, "alpha": 0.0 if s == 1 else 1.0, "redraw_prob": redraw_prob, "use_ema": True,
                   "transformer_config": transformer, "first_stage_config": first_stage}}}


TINY_IMAGEBART = {
    "geometric": [ib_scale(1, 3, "geometric", ib_xtransformer(3, True, IB_L + 1), IB_VQGAN_REMAP),
                  ib_scale(2, 3, "geometric", ib_xtransformer(3, True, IB_L + 1), IB_VQGAN_REMAP),
                  ib_scale(3, 3, "geometric", ib_gpt(False), IB_VQGAN_REMAP)],
    "custom": [ib_scale(1, 2, "bernoulli_PSIM", ib_xtransformer(2, False, IB_L + 2), IB_VQGAN),
               ib_scale(2, 2, "bernoulli_PSIM", ib_gpt(True), IB_VQGAN)],
}
# The release-sized chains whose key lists are checked: the repository's own configs (first stages without their
# checkpoint path, which the key list does not need).
RELEASE_IMAGEBART = {"ffhq_4_scales_geometric": [f"configs/ffhq/4_scales/ffhq-geometric-scale{s}.yaml"
                                                 for s in range(1, 5)],
                     "churches_3_scales": [f"configs/lsun-churches/lsun-churches-scale{s}.yaml" for s in range(1, 4)]}


def import_imagebart(checkout: Path, taming: Path) -> types.ModuleType:
    main = import_taming(taming)  # its main.py: instantiate_from_config without ImageBART's data imports
    sys.path.insert(1, str(checkout))
    import imagebart.models.diffusion  # noqa: F401  (fails here, not inside instantiate, when a dependency is missing)

    return main


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter and EMA copy random (LayerNorm gains near 1): a loader that drops, swaps or mixes up any
    tensor, or reads the live weights where the release samples with the EMA ones, gives other outputs."""
    randomise_transformer(model, generator)
    randomise_conv(model.first_stage_model, generator)  # convolutions at unit gain, norms near 1


def randomise_transformer(model: torch.nn.Module, generator: torch.Generator) -> None:
    """A scale's transformer and its EMA copy random, LayerNorm gains near 1 (every Linear weight is 2-D)."""
    with torch.no_grad():
        tensors = list(model.transformer.named_parameters())
        if getattr(model, "transformer_ema", None) is not None:
            tensors += [(n, b) for n, b in model.transformer_ema.named_buffers() if b.is_floating_point()
                        and n != "decay"]
        for name, p in tensors:
            gain = name.endswith("weight") and p.dim() == 1  # LayerNorms (every Linear weight is 2-D)
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(noise * (0.3 if p.dim() > 1 else 0.1) + (1.0 if gain else 0.0))


def randomise_conv(module: torch.nn.Module, generator: torch.Generator) -> None:
    """A convolutional network's weights random at unit gain (N(0, 1 / fan_in)), norm gains near 1, biases near 0,
    so that activations keep their scale through many layers and every tensor matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() > 1:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def imagebart_fixtures(checkout: Path, taming: Path, out: Path) -> None:
    import os

    from omegaconf import OmegaConf

    main = import_imagebart(checkout, taming)
    os.chdir(checkout)  # schedules such as bernoulli_PSIM read data/<set>_schedule_vs_metric.p from here
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)
    outputs: dict = {"checkout_commit": commit_of(checkout)}
    used = torch.randperm(24, generator=g)[:IB_V].sort().values.numpy()  # the geometric chain's effective codes
    (out / "geometric" / "data" / "vqgan_indices").mkdir(parents=True, exist_ok=True)
    np.save(out / "geometric" / IB_REMAP, used)
    for chain, configs in TINY_IMAGEBART.items():
        folder = out / chain
        folder.mkdir(exist_ok=True)
        x_prev = torch.randint(0, IB_V, (3, IB_L), generator=g)
        x_t = torch.randint(0, IB_V, (3, IB_L), generator=g)
        outputs[chain] = {"x_prev": x_prev, "x_t": x_t}
        for s, config in enumerate(configs, start=1):
            torch.manual_seed(SEED + s)
            built = OmegaConf.create(config)
            if "remap" in built.model.params.first_stage_config.params:  # here the checkout is the working folder
                built.model.params.first_stage_config.params.remap = str(folder / IB_REMAP)
            model = main.instantiate_from_config(built.model).eval()
            randomise(model, g)
            sd = model.state_dict()
            if s > 1 or chain != "geometric":  # the loader reads no first stage; one copy shows it is skipped
                sd = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
            torch.save(lightning_checkpoint(sd), folder / f"scale{s}.ckpt")
            OmegaConf.save(OmegaConf.create(config), folder / f"scale{s}.yaml")
            scale = torch.full((3, 1), s, dtype=torch.long)
            with torch.no_grad(), model.ema_scope():  # the released sampler's weights
                if s == len(configs):
                    logits, _ = model(x_prev, scale)  # [s, x_0 .. x_{L-2}] -> p(x_{s-1})
                else:
                    logits, _ = model(x_prev, x_t, scale)  # encoder [s, x_s], decoder [sos, x_{s-1}]
            outputs[chain][f"scale{s}_logits"] = logits
            if s == 1 and chain == "geometric":  # its first stage: encode (remapped ids) and decode
                first = model.first_stage_model
                images = torch.rand(3, 3, IB_SIDE, IB_SIDE, generator=g) * 2 - 1
                with torch.no_grad():
                    outputs[chain]["images"] = images
                    outputs[chain]["prequant"] = first.encode_to_prequant(images)  # (B, 4, h, w)
                    outputs[chain]["encoded"] = first.encode(images)[2][2]  # (B, h, w) positions in the remap list
                    outputs[chain]["decoded"] = model.decode_to_img(x_prev, (3, 4, IB_SIDE, IB_SIDE))
            outputs[chain]["betas"] = model.temperature_range.clone()  # beta_s of scales s = 0..n_scales
        sampling = {"checkpoints": [f"scale{s}.ckpt" for s in range(1, len(configs) + 1)],
                    "configs": [f"scale{s}.yaml" for s in range(1, len(configs) + 1)]}
        (folder / "sampling.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(sampling)))
        if chain == "custom":  # the metric table its schedule is read from (the repository's data/ folder)
            (folder / "data").mkdir(exist_ok=True)
            shutil.copy(checkout / "data" / "in_schedule_vs_metric.p", folder / "data")
    torch.save(outputs, out / "outputs.pt")
    release: dict = {}
    for name, paths in RELEASE_IMAGEBART.items():
        release[name] = []
        for s, path in enumerate(paths, start=1):
            config = OmegaConf.load(path)
            config.model.params.first_stage_config.params.pop("ckpt_path", None)
            with torch.device("meta"):
                model = main.instantiate_from_config(config.model)
            model.set_noise_schedule()  # again off the meta device, for the schedule's values
            # the first stage only of scale 1, the one the loader reads; its remap list next to the key list
            keys = {k: list(v.shape) for k, v in model.state_dict().items()
                    if s == 1 or not k.startswith("first_stage_model.")}
            remap = config.model.params.first_stage_config.params.get("remap")
            if s == 1 and remap:
                (out / "release" / Path(remap).parent).mkdir(parents=True, exist_ok=True)
                shutil.copy(remap, out / "release" / remap)
            release[name].append({"config": OmegaConf.to_container(config), "keys": keys,
                                  "betas": model.temperature_range.tolist()})
    # ~400 kB of repetitive names as plain text; mtime 0 so that the file regenerates byte-identical
    with gzip.GzipFile(out / "release_keys.json.gz", "wb", mtime=0) as f:
        f.write((json.dumps(release) + "\n").encode())
    print(f"wrote {out}/geometric, custom, outputs.pt, release_keys.json.gz")


# ---- 256-px release-shaped models (--e2e) ------------------------------------------------------------------------
# Per family, the smallest model the official code builds with a release's shape: 256 x 256 RGB images through an
# f = 16 first stage (ch_mult of length 5, the narrowest channels its GroupNorms allow, one residual block per
# level, attention at 16 x 16) to a 16 x 16 grid (L = 256) of 32 codes, under a 2-layer, 2-head, 16-wide
# transformer; random weights, saved in the release's own file layout. An evaluate-only run on a 256-px image
# folder goes through these end to end; the official outputs next to them check the loaders at that shape.
E2E_SEED = SEED + 256  # its own stream: the tiny fixtures above regenerate unchanged
E2E_SIDE, E2E_GRID, E2E_V = 256, 16, 32
E2E_DDCONFIG = {"double_z": False, "z_channels": 4, "resolution": E2E_SIDE, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [E2E_GRID], "dropout": 0.0}
# One layer: each minGPT layer carries its causal mask as a (block_size, block_size) buffer, 256 kB at L = 256.
E2E_GPT = {"vocab_size": E2E_V, "block_size": E2E_GRID ** 2, "n_layer": 1, "n_head": 2, "n_embd": 16}
E2E_TAMING = release_shaped(TINY_TAMING, E2E_GPT, {"embed_dim": 4, "n_embed": E2E_V, "ddconfig": E2E_DDCONFIG},
                            grid=E2E_GRID)
E2E_UNLEASHING = {**TINY_UNLEASHING, "nf": 32, "ch_mult": [1, 1, 1, 1, 1], "img_size": E2E_SIDE,
                  "attn_resolutions": [E2E_GRID], "latent_shape": [1, E2E_GRID, E2E_GRID],
                  "block_size": E2E_GRID ** 2, "total_steps": E2E_GRID ** 2, "bert_n_layers": 1}
# One 256-px image encoded and one code grid decoded: the decoded float32 image is most of the outputs' size and
# the convolutions at 256 px most of the tests' time. The image is uint8, as read from an image folder.
E2E_IMAGES = 1


def e2e_image(generator: torch.Generator) -> torch.Tensor:
    """(E2E_IMAGES, 3, 256, 256) uint8 noise, an image file's pixels."""
    return torch.randint(0, 256, (E2E_IMAGES, 3, E2E_SIDE, E2E_SIDE), generator=generator, dtype=torch.uint8)


def randomise_gpt(module: torch.nn.Module, generator: torch.Generator) -> None:
    """A minGPT's weights random (LayerNorm gains near 1), as the tiny fixtures' transformers."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            parts = name.split(".")
            gain = len(parts) > 1 and parts[-2].startswith("ln") and parts[-1] == "weight"
            p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if gain else 0.0))


def taming_e2e(checkout: Path, out: Path) -> None:
    """last.ckpt + project.yaml of a 256-px unconditional Net2NetTransformer, with its official outputs."""
    from omegaconf import OmegaConf

    main = import_taming(checkout)
    torch.manual_seed(E2E_SEED)
    config = OmegaConf.create(E2E_TAMING)
    model = main.instantiate_from_config(config.model).eval()
    g = torch.Generator().manual_seed(E2E_SEED)
    randomise_conv(model.first_stage_model, g)
    randomise_gpt(model.transformer, g)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(lightning_checkpoint(model.state_dict()), out / "last.ckpt")
    OmegaConf.save(config, out / "project.yaml")

    pixels = e2e_image(g)
    images = pixels.float() / 127.5 - 1  # taming's [-1, 1]
    codes = torch.randint(0, E2E_V, (3, E2E_GRID ** 2), generator=g)
    with torch.no_grad():
        first = model.first_stage_model
        prequant = first.quant_conv(first.encoder(images))
        _, encoded = model.encode_to_z(images)  # (B, L) code indices, raster order
        sos = torch.full((3, 1), model.sos_token, dtype=torch.long)
        code_logits, _ = model.transformer(torch.cat([sos, codes[:, :-1]], dim=1))
        decoded = model.decode_to_img(codes[:E2E_IMAGES], (E2E_IMAGES, 4, E2E_GRID, E2E_GRID))
    torch.save({"pixels": pixels, "prequant": prequant, "encoded": encoded, "codes": codes,
                "code_logits": code_logits, "decoded": decoded, "checkout_commit": commit_of(checkout)},
               out / "outputs.pt")
    print(f"wrote {out}/last.ckpt, project.yaml, outputs.pt")


def unleashing_e2e(checkout: Path, out: Path) -> None:
    """absorbing_ema_0.th + vqgan_ema_0.th + hparams.yaml of a 256-px sampler and VQGAN, with official outputs."""
    import yaml

    models = import_unleashing(checkout)
    torch.manual_seed(E2E_SEED)
    H = unleashing_H(E2E_UNLEASHING)
    ae = on_cpu(lambda: models.VQAutoEncoder(H)).eval()
    disc = models.vqgan.Discriminator(H.n_channels, H.ndf, n_layers=H.disc_layers)
    denoiser = models.Transformer(H)
    g = torch.Generator().manual_seed(E2E_SEED)
    randomise_conv(ae, g)
    randomise_conv(disc, g)
    codebook = ae.quantize.embedding.weight.detach().clone()
    sampler = models.AbsorbingDiffusion(H, denoiser, H.codebook_size, codebook).eval()
    randomise_gpt(sampler, g)
    with torch.no_grad():
        for _, b in sampler.named_buffers():
            b.copy_(torch.rand(b.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    # as the tiny fixture: the VQGAN file without the LPIPS network no loader reads
    vqgan_sd = ({f"ae.{k}": v for k, v in ae.state_dict().items()}
                | {f"disc.{k}": v for k, v in disc.state_dict().items()})
    torch.save(vqgan_sd, out / "vqgan_ema_0.th")
    torch.save(sampler.state_dict(), out / "absorbing_ema_0.th")
    (out / "hparams.yaml").write_text(yaml.safe_dump(E2E_UNLEASHING))

    B, L, V = 4, E2E_GRID ** 2, H.codebook_size
    pixels = e2e_image(g)
    images = pixels.float() / 255  # the authors' [0, 1] range
    codes = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < torch.tensor([0.0, 0.3, 0.8, 1.0]).unsqueeze(1)
    x_t = codes.masked_fill(masked, V)
    with torch.no_grad():
        latents = ae.encoder(images)
        _, _, stats = ae.quantize(latents)
        encoded = stats["min_encoding_indices"].view(E2E_IMAGES, E2E_GRID, E2E_GRID)
        one_hot = torch.nn.functional.one_hot(codes[:E2E_IMAGES].reshape(-1), V).float()
        decoded = ae.generator(sampler.embed(one_hot.view(E2E_IMAGES, L, V)))  # utils/sampler_utils.get_samples
        logits = sampler._denoise_fn(x_t)
    torch.save({"pixels": pixels, "latents": latents, "encoded": encoded, "codes": codes, "decoded": decoded,
                "x_t": x_t, "logits": logits, "checkout_commit": commit_of(checkout)}, out / "outputs.pt")
    print(f"wrote {out}/absorbing_ema_0.th, vqgan_ema_0.th, hparams.yaml, outputs.pt")


# ImageBART's FFHQ 2-scale custom chain in shape (T = 3): a plain XTransformer scale with x-transformers' default
# heads of 64, then a decoder-only minGPT; the ffhq_bernoulli_PSIM schedule read from the FFHQ metric table; the
# first stage a separate taming VQGAN checkpoint (the release's vqgan.zip) that the scale configs name by
# ckpt_path, shrunk by a remap list to its 32 used codes of 40. Paths relative to the folder, which stands for the
# repository (configs/sampling/*.yaml's checkpoints and configs, the configs' ckpt_path, remap and data/).
E2E_IB_REMAP = "data/vqgan_indices/e2e_indices.npy"
E2E_IB_VQGAN_CKPT = "vqgan/vqgan-e2e.ckpt"
E2E_IB_FIRST_STAGE = {"target": IB_VQGAN["target"],
                      "params": {"ckpt_path": E2E_IB_VQGAN_CKPT, "remap": E2E_IB_REMAP, "sane_index_shape": True,
                                 "embed_dim": 4, "n_embed": 40, "ddconfig": E2E_DDCONFIG,
                                 "lossconfig": IB_VQGAN["params"]["lossconfig"]}}
E2E_IB_SCHEDULE = "ffhq_bernoulli_PSIM"
E2E_IMAGEBART = [
    {"model": {"base_learning_rate": 0.0625, "target": "imagebart.models.diffusion.DenoisingXTransformer",
               "params": {"first_stage_key": "image", "monitor": "val/loss", "n_scales": 2, "single_scale": 1,
                          "top_k": E2E_V, "alpha": 0.0, "redraw_prob": E2E_IB_SCHEDULE, "use_ema": True,
                          "transformer_config": {
                              "target": "imagebart.modules.xtransformers.x_transformer.XTransformer",
                              "params": {"wrap_decoder": False, "dim": 16, "enc_num_tokens": E2E_V, "enc_depth": 2,
                                         "enc_heads": 2, "enc_max_seq_len": E2E_GRID ** 2 + 1,
                                         "dec_num_tokens": E2E_V, "dec_depth": 1, "dec_heads": 2,
                                         "tie_token_emb": False, "dec_max_seq_len": E2E_GRID ** 2}},
                          "first_stage_config": E2E_IB_FIRST_STAGE}}},
    {"model": {"base_learning_rate": 0.0625, "target": "imagebart.models.diffusion.DecoderOnlyDenoiser",
               "params": {"first_stage_key": "image", "monitor": "val/loss", "n_scales": 2, "single_scale": 2,
                          "top_k": E2E_V, "alpha": 1.0, "redraw_prob": E2E_IB_SCHEDULE, "use_ema": True,
                          "transformer_config": {"target": "imagebart.modules.transformer.mingpt.GPT",
                                                 "params": E2E_GPT},
                          "first_stage_config": E2E_IB_FIRST_STAGE}}},
]


def imagebart_e2e(checkout: Path, taming: Path, out: Path) -> None:
    """A 256-px 2-scale chain laid out as the release (scale checkpoints and configs, a configs/sampling-style
    list, the VQGAN checkpoint, its remap list, the schedule's table), with the official outputs."""
    import os

    from omegaconf import OmegaConf

    main = import_imagebart(checkout, taming)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data" / "vqgan_indices").mkdir(parents=True, exist_ok=True)
    (out / "vqgan").mkdir(exist_ok=True)
    shutil.copy(checkout / "data" / "ffhq_schedule_vs_metric.p", out / "data")
    os.chdir(out)  # the official code reads ckpt_path, remap and data/ relative to the repository, here `out`
    g = torch.Generator().manual_seed(E2E_SEED)
    n_embed = E2E_IB_FIRST_STAGE["params"]["n_embed"]
    used = torch.randperm(n_embed, generator=g)[:E2E_V].sort().values.numpy()
    np.save(E2E_IB_REMAP, used)
    # the VQGAN as taming-transformers trains and saves it (no remap: vqgan.zip's checkpoints predate the lists)
    torch.manual_seed(E2E_SEED)
    vq_params = {k: v for k, v in E2E_IB_FIRST_STAGE["params"].items() if k not in ("ckpt_path", "remap")}
    vqgan = main.instantiate_from_config(OmegaConf.create({"target": "taming.models.vqgan.VQModel",
                                                           "params": vq_params}))
    randomise_conv(vqgan, g)
    torch.save(lightning_checkpoint(vqgan.state_dict()), E2E_IB_VQGAN_CKPT)

    L = E2E_GRID ** 2
    x_prev = torch.randint(0, E2E_V, (3, L), generator=g)
    x_t = torch.randint(0, E2E_V, (3, L), generator=g)
    outputs: dict = {"x_prev": x_prev, "x_t": x_t, "checkout_commit": commit_of(checkout)}
    n = len(E2E_IMAGEBART)
    for s, config in enumerate(E2E_IMAGEBART, start=1):
        torch.manual_seed(E2E_SEED + s)
        model = main.instantiate_from_config(OmegaConf.create(config).model).eval()  # loads the VQGAN checkpoint
        randomise_transformer(model, g)  # the first stage stays the checkpoint's
        # the release's scale files: transformer, EMA copy and the chain's buffers; the first stage is vqgan/'s
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith("first_stage_model.")}
        torch.save(lightning_checkpoint(sd), f"scale{s}.ckpt")
        OmegaConf.save(OmegaConf.create(config), f"scale{s}.yaml")
        scale = torch.full((3, 1), s, dtype=torch.long)
        with torch.no_grad(), model.ema_scope():
            if s == n:
                logits, _ = model(x_prev, scale)  # [s, x_0 .. x_{L-2}] -> p(x_{s-1})
            else:
                logits, _ = model(x_prev, x_t, scale)  # encoder [s, x_s], decoder [sos, x_{s-1}]
        outputs[f"scale{s}_logits"] = logits
        outputs["betas"] = model.temperature_range.clone()
        if s == 1:  # the first stage as the official chain builds it from the config (checkpoint + remap)
            first = model.first_stage_model
            pixels = e2e_image(g)
            images = pixels.float() / 127.5 - 1
            with torch.no_grad():
                outputs["pixels"] = pixels
                outputs["prequant"] = first.encode_to_prequant(images)
                outputs["encoded"] = first.encode(images)[2][2]  # (B, h, w) positions in the remap list
                outputs["decoded"] = model.decode_to_img(x_prev[:E2E_IMAGES], (E2E_IMAGES, 4, E2E_GRID, E2E_GRID))
    sampling = {"checkpoints": [f"scale{s}.ckpt" for s in range(1, n + 1)],
                "configs": [f"scale{s}.yaml" for s in range(1, n + 1)]}
    Path("sampling.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(sampling)))
    torch.save(outputs, "outputs.pt")
    print(f"wrote {out}: scale1/2.ckpt and .yaml, sampling.yaml, {E2E_IB_VQGAN_CKPT}, {E2E_IB_REMAP}, "
          "data/ffhq_schedule_vs_metric.p, outputs.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=["taming", "unleashing", "imagebart"])
    parser.add_argument("--checkout", type=Path, required=True, help="the official repository's checkout")
    parser.add_argument("--taming", type=Path, help="imagebart: a taming-transformers checkout (its first stage)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fixture files")
    parser.add_argument("--e2e", action="store_true",
                        help="write the 256-px release-shaped model (f = 16, 16 x 16 grid) instead of the tiny one")
    args = parser.parse_args()
    if args.family == "imagebart":
        if args.taming is None:
            parser.error("imagebart needs --taming PATH/taming-transformers")
        make = imagebart_e2e if args.e2e else imagebart_fixtures
        make(args.checkout.resolve(), args.taming.resolve(), args.out.resolve())
    elif args.e2e:
        {"taming": taming_e2e, "unleashing": unleashing_e2e}[args.family](args.checkout.resolve(), args.out)
    else:
        {"taming": taming_fixtures, "unleashing": unleashing_fixtures}[args.family](args.checkout.resolve(), args.out)


if __name__ == "__main__":
    main()
