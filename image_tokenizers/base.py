"""The one small interface every tokenizer implements.

A tokenizer maps uint8 images (B, C, H, W) to grids of codebook ids (B, h, w) in [0, K) and back. The harness
knows it only through this class: it is built from conf/tokenizer/NAME.yaml (`name:` picks a class of the
registry image_tokenizers.TOKENIZERS, `class:` names one elsewhere), its stage is cached under `content_key`,
`build` runs once per key (training the tokenizer, or recording which release the key stands for) and `load`
makes a built one ready to `encode` and `decode`. A new tokenizer is a file in image_tokenizers/ and a yaml in
conf/tokenizer/; nothing under bench/ names it.

Options every tokenizer has (TokensOptions) say how the tokens stage uses it; a tokenizer's own options are its
`Options` dataclass, built by `from_config` through priors.options.options_from (an unknown key or a wrong type
is a one-line ValueError naming `tokenizer.KEY`).
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from priors.options import options_from

# Options of conf/tokenizer/*.yaml that the harness reads itself: the registry's and the tokens stage's.
NAME_KEY, CLASS_KEY = "name", "class"


@dataclass
class TokensOptions:
    """What every conf/tokenizer/*.yaml sets for the tokens stage (the yaml gives the values: no defaults here)."""
    encode_batch_size: int  # images per batch when encoding the dataset into tokens
    hflip_train: bool  # the priors also train on the train images mirrored left-right (validation never is)

    def __post_init__(self) -> None:
        if self.encode_batch_size < 1:
            raise ValueError(f"tokenizer.encode_batch_size={self.encode_batch_size} must be at least 1")


TOKENS_OPTIONS = ("encode_batch_size", "hflip_train")  # fields of TokensOptions
TOKENS_ONLY_OPTIONS = ("hflip_train",)  # tokens-stage options that never change the tokenizer itself


class Tokenizer(abc.ABC):
    """A tokenizer as configured; after `load`, a codec between uint8 images and (B, h, w) codebook ids."""
    name: ClassVar[str]
    Options: ClassVar[type]  # dataclass of the tokenizer's own options (its yaml minus name, class, TokensOptions)
    # False: the tokens stage renumbers the codes the train split uses as 0 .. K_eff - 1 (ImageBART A.1.1), the
    # vocabulary priors trained here see. True: codes keep the tokenizer's own ids (a released prior was trained
    # on them, over the whole codebook).
    keeps_codebook: ClassVar[bool] = False

    def __init__(self, options: Any, config: Mapping[str, Any], resolution: int):
        self.options = options  # an instance of Options
        self.config = dict(config)  # the yaml as given (resolved), for content keys that hash the config
        self.resolution = int(resolution)  # data.resolution: the side of every image it encodes

    @classmethod
    def from_config(cls, config: Mapping[str, Any], resolution: int) -> "Tokenizer":
        """The tokenizer from its yaml without `name`/`class` (TokensOptions' keys are skipped here)."""
        return cls(options_from(cls.Options, config, "tokenizer", owner=cls.name, group="tokenizer",
                                others=TOKENS_OPTIONS), config, resolution)

    # ---- before any work: from the configuration alone ----------------------------------------
    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """K: the ids `encode` returns lie in [0, K)."""

    @property
    @abc.abstractmethod
    def grid(self) -> tuple[int, int]:
        """(h, w) of the token grid of one image at `resolution`: L = h * w."""

    @abc.abstractmethod
    def content_key(self, data_key: str) -> str:
        """The tokenizer stage's cache key: everything its weights depend on, and data_key always (the tokens
        stage's key is derived from this one, and the tokens depend on the data)."""

    def check(self) -> None:
        """Checks that read files (a release's checkpoint); ValueError naming the option. Default: none."""

    def prepare(self) -> None:
        """Put in place what the key depends on and the job may provide (weights files). Default: nothing."""

    @abc.abstractmethod
    def flops(self) -> tuple[float, float]:
        """(encode, decode) FLOPs of one image, for the cost estimate."""

    def training_work(self) -> tuple[int, int] | None:
        """(steps, batch size) when `build` trains, for the cost estimate; None when it loads a release."""
        return None

    # ---- the tokenizer stage -----------------------------------------------------------------
    @abc.abstractmethod
    def build(self, images: torch.Tensor, directory: Path, work: Path, device: str,
              log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
        """Make the tokenizer from the uint8 train images (N, C, H, W): train it and write its weights into
        `directory` (the stage's folder, written atomically by the cache), or record which release it is.
        `work` is kept between interrupted runs (resumable checkpoints) and removed once the stage is built.
        Returns the stage's metadata (JSON)."""

    @abc.abstractmethod
    def load(self, directory: Path, device: str) -> None:
        """Ready to encode and decode, from a finished stage's folder, on `device`, in eval mode."""

    # ---- after load ------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> int64 codebook ids (B, h, w) on the loaded device."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codebook ids (B, h, w) -> uint8 images (B, C, H, W) on the loaded device."""
