"""Parity fixtures for the release loaders, made by the official code itself.

Given a checkout of an official repository, build its model at a tiny configuration with random weights, save it
in the official on-disk format, and save its outputs on fixed inputs next to it. tests/ load those files with the
project's loaders and compare outputs, so a loader is checked against the official code without the released
weights (which these machines cannot download). The same script lists the full key names and shapes of a
release-sized configuration, built by the official modules on the meta device, so the loaders' expectations are
checked against what a released file holds.

    python tools/release_fixtures.py taming --checkout PATH/taming-transformers --out tests/fixtures/releases/taming

Running it needs the official code's own dependencies beside this project's (for taming-transformers:
pytorch-lightning 1.x with torchmetrics, tensorboardX, and transformers < 4.40 for an import in its minGPT;
install them with `pip install --target DIR` and put DIR on PYTHONPATH after the checkout). The official code was
written for torch 1.7: `torch._six`, which torch 2 removed, is recreated with the one name it imports.
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


def commit_of(checkout: Path) -> str:
    head = checkout / ".git" / "HEAD"
    return head.read_text().strip() if head.is_file() else "unknown (not a git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=["taming"])
    parser.add_argument("--checkout", type=Path, required=True, help="the official repository's checkout")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fixture files")
    args = parser.parse_args()
    taming_fixtures(args.checkout.resolve(), args.out)


if __name__ == "__main__":
    main()
