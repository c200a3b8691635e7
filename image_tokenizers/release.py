"""The first stage of a released prior (`tokenizer=release`, set by conf/experiment/release_*.yaml).

A release is a prior together with the first stage it was trained on (releases/): the tokens it is evaluated on
must be that first stage's codes, as the release numbers them. So this tokenizer encodes with the release's own
first stage and keeps its ids (`keeps_codebook`: no effective-codebook remap, the released prior's vocabulary is
the whole codebook), and its options are the job's `release:` block (conf/tokenizer/release.yaml interpolates it).
Nothing is trained: the tokenizer stage records which release its key stands for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from bench.cache import content_key
from image_tokenizers.base import TOKENS_OPTIONS
from image_tokenizers.vqmodel import IndexCodecTokenizer
from releases import Release, ReleaseOptions, load_release


class ReleaseTokenizer(IndexCodecTokenizer):
    name = "release"
    Options = ReleaseOptions
    keeps_codebook = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any], resolution: int) -> "ReleaseTokenizer":
        own = {k: v for k, v in config.items() if k not in TOKENS_OPTIONS}
        return cls(ReleaseOptions.from_config(own, "release"), config, resolution)

    @property
    def release(self) -> Release:
        """The loaded release (once per process: the prior's stage uses the same object)."""
        return load_release(self.options)

    def check(self) -> None:
        r = self.release
        side = self.resolution // r.downsampling
        if self.resolution % r.downsampling or self.grid != r.prior.grid:
            raise ValueError(f"data.resolution={self.resolution} gives a {side}x{side} token grid, but the "
                             f"released prior reads {r.prior.grid[0]}x{r.prior.grid[1]} (its first stage was "
                             f"trained at {r.resolution} px): set data.resolution={r.resolution}")

    @property
    def codebook_size(self) -> int:
        return int(self.release.first_stage.vocab_size)

    @property
    def grid(self) -> tuple[int, int]:
        return self.release.grid_at(self.resolution)

    def content_key(self, data_key: str) -> str:
        return content_key("tokenizer-release-v1", data_key, self.release.key)

    def flops(self) -> tuple[float, float]:
        encode, decode = self.release.first_stage_flops()
        scale = (self.resolution / self.release.resolution) ** 2  # convolutions: FLOPs grow with the pixels
        return encode * scale, decode * scale

    def build(self, images: torch.Tensor, directory: Path, work: Path, device: str,
              log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
        r = self.release
        return {"name": self.name, "family": r.family, "files": [list(f) for f in r.files]}

    def load(self, directory: Path, device: str) -> None:
        self.use(self.release.first_stage, device)
