"""A toy second tokenizer: each patch x patch block of pixels is one token, its mean colour with every channel
rounded to one of `levels` values (K = levels ** 3 codes); decoding paints the block in that colour.

It implements the whole `image_tokenizers.base.Tokenizer` interface with nothing to train, to show that a new tokenizer
needs no change under bench/ (tests/conf/tokenizer/toy.yaml names it by `class:`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.cache import content_key
from image_tokenizers.base import Tokenizer

CHANNELS = 3


@dataclass
class ToyOptions:
    patch: int  # pixels per token side
    levels: int  # values per colour channel (>= 2)

    def __post_init__(self) -> None:
        if self.patch < 1 or self.levels < 2:
            raise ValueError(f"tokenizer.patch={self.patch} must be >= 1 and tokenizer.levels={self.levels} >= 2")


class ToyTokenizer(Tokenizer):
    name = "toy"
    Options = ToyOptions

    @property
    def codebook_size(self) -> int:
        return self.options.levels ** CHANNELS

    @property
    def grid(self) -> tuple[int, int]:
        return self.resolution // self.options.patch, self.resolution // self.options.patch

    def check(self) -> None:
        if self.resolution % self.options.patch:
            raise ValueError(f"tokenizer.patch={self.options.patch} does not divide data.resolution={self.resolution}")

    def content_key(self, data_key: str) -> str:
        return content_key("tokenizer-toy-v1", data_key, asdict(self.options))

    def flops(self) -> tuple[float, float]:
        pixels = float(CHANNELS * self.resolution ** 2)
        return pixels, pixels

    def build(self, images, directory: Path, work: Path, device: str, log_fn=None) -> dict[str, Any]:
        return {"name": self.name}

    def load(self, directory: Path, device: str) -> None:
        self.device = device

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images).to(self.device).double()  # (B, 3, H, W) in [0, 255]
        mean = F.avg_pool2d(x, self.options.patch)  # (B, 3, h, w)
        level = torch.round(mean / 255 * (self.options.levels - 1)).long()  # (B, 3, h, w) in [0, levels)
        return level[:, 0] * self.options.levels ** 2 + level[:, 1] * self.options.levels + level[:, 2]  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        n = self.options.levels
        level = torch.stack([codes // n ** 2, codes // n % n, codes % n], dim=1)  # (B, 3, h, w)
        colour = torch.round(level.double() * 255 / (n - 1)).to(torch.uint8)
        return colour.repeat_interleave(self.options.patch, 2).repeat_interleave(self.options.patch, 3)
