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

Running it needs the official code's own dependencies beside this project's (for taming-transformers:
pytorch-lightning 1.x with torchmetrics, tensorboardX, and transformers < 4.40 for an import in its minGPT;
install them with `pip install --target DIR` and put DIR on PYTHONPATH after the checkout). The official code was
written for torch 1.7: `torch._six`, which torch 2 removed, is recreated with the one name it imports.

unleashing-transformers imports lpips and imageio (pip install --target DIR --no-deps lpips imageio) and, at
module level in utils/log_utils.py, the visdom client of its live plots, which nothing used here calls: an empty
`visdom` module stands in for it. Its models were written for a GPU (Generator puts its `logsigma` head on the
GPU in __init__): while the official modules are built, Module.cuda returns the module unchanged so they build on
the CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import warnings
from pathlib import Path

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
    head = checkout / ".git" / "HEAD"
    return head.read_text().strip() if head.is_file() else "unknown (not a git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=["taming", "unleashing"])
    parser.add_argument("--checkout", type=Path, required=True, help="the official repository's checkout")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fixture files")
    args = parser.parse_args()
    {"taming": taming_fixtures, "unleashing": unleashing_fixtures}[args.family](args.checkout.resolve(), args.out)


if __name__ == "__main__":
    main()
