"""The embedded default tokenizer: a taming-transformers VQGAN trained here on the job's train images
(`tokenizer=vqgan_tiny`, `tokenizer=vqgan_smoke`).

Its `model:` block is image_tokenizers.vqmodel.VQGANConfig (taming's ddconfig + n_embed + embed_dim), its `train:` block
image_tokenizers.vqgan_train.VQGANTrainConfig (taming's VQLPIPSWithDiscriminator settings and the training aids).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.cache import atomic_torch_save, content_key
from priors.options import options_from
from image_tokenizers.base import TOKENS_ONLY_OPTIONS, TOKENS_OPTIONS
from image_tokenizers.vqgan_train import (VQGANTrainConfig, lpips_available, provide_vgg16, train_vqgan,
                                    vgg16_weights_path)
from image_tokenizers.vqmodel import VQGANConfig, VQModel, VQModelTokenizer

log = logging.getLogger(__name__)

# Options of `train:` that do not change the weights: where LPIPS's weights come from is not what they are
# (lpips_on and the file's fixed hash are), and how often a resumable checkpoint is written.
NOT_IN_KEY = ("vgg16_weights", "ckpt_every")
WEIGHTS_FILE = "model.pt"  # in the tokenizer stage's folder: {"config": asdict(VQGANConfig), "state_dict": ...}


@dataclass
class VQGANOptions:
    """conf/tokenizer/vqgan_tiny.yaml: the architecture and its training."""
    model: VQGANConfig
    train: VQGANTrainConfig


class VQGANTokenizer(VQModelTokenizer):
    name = "vqgan"
    Options = VQGANOptions

    @classmethod
    def from_config(cls, config: Any, resolution: int) -> "VQGANTokenizer":
        known = ["model", "train", *TOKENS_OPTIONS]
        for key in config:
            if key not in known:
                raise ValueError(f"tokenizer.{key} is not an option of tokenizer={cls.name} "
                                 f"(options: {', '.join(known)})")
        blocks = {}
        for block, block_cls in (("model", VQGANConfig), ("train", VQGANTrainConfig)):
            try:
                blocks[block] = options_from(block_cls, config.get(block), f"tokenizer.{block}", owner=cls.name,
                                             group="tokenizer")
            except (ValueError, TypeError) as e:  # TypeError: a required field is missing
                msg = str(e).splitlines()[0]
                raise ValueError(msg if msg.startswith("tokenizer.") else f"tokenizer.{block}: {msg}") from None
        return cls(VQGANOptions(**blocks), config, resolution)

    @property
    def model_config(self) -> VQGANConfig:
        return self.options.model

    def check(self) -> None:
        if self.options.model.resolution != self.resolution:
            raise ValueError(f"tokenizer.model.resolution={self.options.model.resolution} does not match "
                             f"data.resolution={self.resolution}")

    def prepare(self) -> None:
        if self.options.train.perceptual_weight > 0:
            provide_vgg16(self.options.train.vgg16_weights)  # before the key: it says whether LPIPS is on

    def content_key(self, data_key: str) -> str:
        # Whether LPIPS can run changes the trained weights, so it is part of the key.
        lpips_on = self.options.train.perceptual_weight > 0 and lpips_available()
        # The yaml as given, under the key's first layout (when `name` was spelled `kind`), so that tokenizers
        # trained before stay cached.
        options = {"kind": self.name, **{k: v for k, v in self.config.items() if k not in TOKENS_ONLY_OPTIONS}}
        if isinstance(options.get("train"), dict):
            options["train"] = {k: v for k, v in options["train"].items() if k not in NOT_IN_KEY}
        return content_key("tokenizer-vqgan-v1", data_key, options, lpips_on)

    def training_work(self) -> tuple[int, int]:
        return self.options.train.steps, self.options.train.batch_size

    def build(self, images: torch.Tensor, directory: Path, work: Path, device: str,
              log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
        self.check()
        train_cfg = self.options.train
        torch.manual_seed(train_cfg.seed)
        model = VQModel(self.options.model)
        log.info("tokenizer: training a VQGAN (%.2fM parameters) for %d steps on %d images",
                 sum(p.numel() for p in model.parameters()) / 1e6, train_cfg.steps, len(images))
        if train_cfg.perceptual_weight > 0:
            log.info("tokenizer: LPIPS perceptual term %s", "on" if lpips_available() else
                     f"off: its VGG16 weights are not at {vgg16_weights_path()} "
                     f"(tokenizer.train.vgg16_weights=download fetches them)")
        else:
            log.info("tokenizer: LPIPS perceptual term off (tokenizer.train.perceptual_weight=0)")
        t0 = time.time()
        stats = train_vqgan(model, images, train_cfg, device=device, log=log_fn, work_dir=work)
        seconds = time.time() - t0
        atomic_torch_save({"config": asdict(self.options.model),
                           "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, directory / WEIGHTS_FILE)
        return {"name": self.name, "train_seconds": seconds, "train_stats": stats}

    def load(self, directory: Path, device: str) -> None:
        self.use(load_vqgan(directory / WEIGHTS_FILE), device)


def load_vqgan(path: Path) -> VQModel:
    """The VQModel of a checkpoint written by VQGANTokenizer.build (its config rebuilds the model)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = VQModel(VQGANConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
