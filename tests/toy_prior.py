"""A toy fourth prior: tokens independent across positions, p(x) = prod_i softmax(W_i)[x_i].

It implements the whole `priors.base.Prior` interface (exact NLL, sampling, completion, NFE) in a few lines,
to show that a new prior needs no change under bench/.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from priors.base import NLL, Prior


class ToyPrior(Prior):
    name = "toy"
    T_applies = "none"
    validation_keys = ("bits_per_token",)
    validation_note = "its exact NLL on the validation batches"

    def __init__(self, vocab_size: int, grid: tuple[int, int], temperature: float = 1.0):
        super().__init__(vocab_size, grid)
        self.model = nn.Module()
        self.model.logits = nn.Parameter(torch.zeros(self.seq_len, self.vocab_size))  # (L, V)
        self.temperature = float(temperature)

    @classmethod
    def from_budget(cls, vocab_size: int, grid: tuple[int, int], budget: int, T: int | None = None,
                    sample: Mapping[str, Any] | None = None) -> "ToyPrior":
        """No size options (Prior.size_options is empty): the preset's n_layer never reaches it."""
        return cls(vocab_size, grid, **dict(sample or {}))

    def units(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def arch_config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "grid": list(self.grid)}

    def _log_probs(self) -> torch.Tensor:
        return F.log_softmax(self.model.logits / self.temperature, dim=-1)  # (L, V)

    def unit_loss(self, unit, x, generator=None):
        loss = -self._log_probs().gather(1, x.T).mean()  # nats per token
        return loss, {"bits_per_token": loss.item() / math.log(2)}

    @torch.no_grad()
    def nll(self, x, generator=None) -> NLL:
        nats = -self._log_probs().gather(1, x.T).sum(0)  # (B,)
        return NLL(per_sequence=(nats / (self.seq_len * math.log(2))).double().cpu(), kind="exact")

    @torch.no_grad()
    def sample(self, n, generator=None):
        probs = self._log_probs().exp().repeat(n, 1)  # (n * L, V)
        return torch.multinomial(probs, 1, generator=generator).view(n, self.seq_len)

    @torch.no_grad()
    def complete(self, x, keep_mask, generator=None):
        return torch.where(keep_mask.bool(), x, self.sample(len(x), generator).to(x.device))

    def nfe(self) -> int:
        return 1

    def completion_nfe(self, keep_mask) -> int:
        return 1
