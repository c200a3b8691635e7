"""The one small interface every prior implements.

A prior models token grids x of shape (B, L) with L = H*W raster-ordered tokens
over a vocabulary of V = K_eff codes (the effective codebook of the shared token
cache). Special ids (start, mask) are derived from V inside each prior and never
leak out: every tensor a prior returns holds ids in [0, V).

Training is organised in *units*: the independently trained pieces of a prior.
AR and absorbing have one unit ("model"); ImageBART has one per scale
("scale2" ... "scaleT"), each with its own optimizer, EMA and checkpoint, so a
cluster can train them in parallel (ImageBART Sec. 3.3).
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then restore the caller's train/eval mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def sampling_settings(sample: Mapping[str, Any] | None, flat: Mapping[str, Any], allowed: tuple[str, ...]
                      ) -> dict[str, Any]:
    """A prior's sampling-only settings, given nested (`sample={...}` as in the YAML) or flattened (`key=...`).

    Raises ValueError naming the first duplicated or unknown key (as `prior.KEY`).
    """
    settings = dict(sample or {})
    for key, value in flat.items():
        if key in settings:
            raise ValueError(f"prior.{key} given both flattened and under prior.sample")
        settings[key] = value
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise KeyError(unknown[0])
    return settings


@dataclass(frozen=True)
class NLL:
    bits_per_token: float  # mean negative log-likelihood (or its bound) per token, in bits
    stderr: float | None  # standard error of a Monte Carlo estimate; None when exact/deterministic
    kind: str  # "exact" (AR) or "elbo" (an upper bound on -log2 p(x) per token)


class Prior(nn.Module, abc.ABC):
    name: ClassVar[str]
    # Whether the chain length / step count T changes what is trained. Only
    # ImageBART's does; AR ignores T and absorbing uses it only for sampling.
    T_affects_training: ClassVar[bool] = False

    def __init__(self, vocab_size: int, grid: tuple[int, int]):
        super().__init__()
        self.vocab_size = int(vocab_size)  # V = K_eff
        self.grid = (int(grid[0]), int(grid[1]))
        self.seq_len = self.grid[0] * self.grid[1]  # L

    # ---- training -------------------------------------------------------
    @abc.abstractmethod
    def units(self) -> dict[str, nn.Module]:
        """The independently trained modules, by name (insertion order = training order)."""

    @abc.abstractmethod
    def unit_loss(self, unit: str, x: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of one unit on clean tokens x (B, L), plus floats to log."""

    # ---- evaluation -----------------------------------------------------
    @abc.abstractmethod
    def nll(self, x: torch.Tensor, generator: torch.Generator | None = None) -> NLL:
        """Negative log-likelihood (or its ELBO bound) of held-out tokens x (B, L) in bits per token."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n unconditional samples (n, L), int64 in [0, V)."""

    @abc.abstractmethod
    def complete(self, x: torch.Tensor, keep_mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Regenerate the positions where keep_mask (B, L) is False; kept positions are returned unchanged."""

    @abc.abstractmethod
    def nfe(self) -> int:
        """Network evaluations one call of sample() makes (per batch, whatever its size)."""

    @abc.abstractmethod
    def arch_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this prior's modules; stored in every checkpoint."""

    def num_params(self) -> int:
        """Trainable transformer parameters, the quantity budget.params constrains."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
