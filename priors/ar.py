"""Autoregressive prior (Taming Transformers): a GPT over raster-ordered VQGAN tokens.

p(x) = prod_i p(x_i | x_<i): the input is [start, x_0, ..., x_{L-2}] and the
output at position i predicts x_i, so the likelihood is exact and sampling needs
one network call per token (L calls, each on one new token through the KV cache).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from priors.base import NLL, Prior, eval_mode, generated_span
from priors.flops import decoder_sample_flops
from priors.options import LogitSampling, TransformerPriorConfig, fit_arch, options_from
from priors.transformer import (Transformer, check_sampling, compiled, decode_logits, decode_threads,
                                sample_logits)


@dataclass
class ARConfig(TransformerPriorConfig):
    """The AR prior's architecture (arch_config() is its asdict): one GPT whose special input id V is the start id.
    Its sampling settings (temperature, top_k, top_p) are a LogitSampling: they never change what is trained."""
    causal: ClassVar[bool] = True  # position i sees the start id and x_0 .. x_{i-1} only


class ARPrior(Prior):
    name = "ar"
    label = "AR (Taming)"  # how reports name it
    validation_keys = ("bits_per_token",)
    size_options = ("n_layer", "n_head")
    validation_note = "its exact NLL on the selection batches"

    def __init__(self, vocab_size: int, grid: tuple[int, int], n_layer: int, n_head: int, d_model: int,
                 dropout: float = 0.0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, start_id: int | None = None):
        """start_id: None (priors trained here) makes the start a special id V, after the codes 0 .. V-1; a
        code in [0, V) starts every sequence with that code instead, with no extra embedding row (Taming
        Transformers' unconditional models: their SOS token is a code id)."""
        super().__init__(vocab_size, grid)
        check_sampling(temperature, top_k, top_p)
        if start_id is not None and not 0 <= start_id < self.vocab_size:
            raise ValueError(f"start_id={start_id} must be a code id in [0, {self.vocab_size}) or None")
        self.start_id = self.vocab_size if start_id is None else int(start_id)
        self.arch = ARConfig(vocab_size=self.vocab_size, grid=list(self.grid), n_layer=n_layer, n_head=n_head,
                             d_model=d_model, dropout=dropout)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        config = self.arch.transformer_config()
        self.model = Transformer(config if start_id is None else replace(config, vocab_in=self.vocab_size))

    @classmethod
    def from_budget(cls, vocab_size: int, grid: tuple[int, int], budget: int, T: int | None = None, *,
                    sample: Mapping[str, Any] | None = None, **options: Any) -> "ARPrior":
        """The AR prior whose width d_model puts its parameter count closest to `budget`.

        options: those of conf/prior/ar.yaml (ARConfig's fields but the derived vocab_size, grid and d_model),
        with the sampling settings under `sample` (LogitSampling); unknown keys and bad values raise a
        one-line ValueError. T is accepted for the common signature and ignored (the AR prior has no chain).
        """
        settings = options_from(LogitSampling, sample, "prior.sample", owner=cls.name)
        arch = fit_arch(ARConfig, options, vocab_size, grid, budget, owner=cls.name, others=("sample",))
        return cls(**asdict(arch), **asdict(settings))

    def set_eval_options(self, T: int | None, options: Mapping[str, Any]) -> None:
        s = options_from(LogitSampling, options.get("sample"), "prior.sample", owner=self.name)
        self.temperature, self.top_k, self.top_p = s.temperature, s.top_k, s.top_p

    def arch_config(self) -> dict[str, Any]:
        # Architecture only; sampling settings are not part of a checkpoint (they never retrain).
        return asdict(self.arch)

    # ---- training -------------------------------------------------------
    def units(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, V): position i sees start, x_0 .. x_{i-1} and predicts x_i."""
        start = torch.full_like(x[:, :1], self.start_id)  # (B, 1)
        return self.model(torch.cat([start, x[:, :-1]], dim=1))  # (B, L, V)

    def unit_loss(self, unit: str, x: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        if unit != "model":
            raise ValueError(f"unit={unit} is not a unit of prior=ar (units: model)")
        # Next-token cross-entropy = -(1/L) log p(x) in nats per token: the Taming Transformers
        # objective E[-log p(s)], which is Eq. 8, ImageBART, at T = 2 (x_2 uniform).
        loss = F.cross_entropy(self.logits(x).reshape(-1, self.vocab_size), x.reshape(-1))
        value = loss.item()
        return loss, {"loss": value, "bits_per_token": value / math.log(2)}

    # ---- evaluation -----------------------------------------------------
    def nll(self, x: torch.Tensor, generator: torch.Generator | None = None) -> NLL:
        """Exact -log2 p(x) / L of each sequence (chain rule over the raster order): kind "exact"."""
        x = x.to(self.device)
        with eval_mode(self), torch.no_grad():
            logp = self.logits(x).float().log_softmax(dim=-1)  # (B, L, V)
            nats = -logp.gather(-1, x.unsqueeze(-1)).squeeze(-1).double().sum(dim=1)  # (B,)
        return NLL(per_sequence=(nats / (self.seq_len * math.log(2))).cpu(), kind="exact")

    def _next(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is not None and generator.device != logits.device:
            # multinomial needs a generator on the logits' device; a CPU generator with a CUDA
            # prior still works (and reproduces), at the price of a (B, V) copy per token.
            tokens = sample_logits(logits.to(generator.device), self.temperature, self.top_k, self.top_p, generator)
            return tokens.to(logits.device)  # (B,)
        return sample_logits(logits, self.temperature, self.top_k, self.top_p, generator)  # (B,)

    def sample(self, n: int, generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """n samples (n, L) in raster order; use_cache=False recomputes the whole prefix at every step."""
        keep = torch.zeros(n, self.seq_len, dtype=torch.bool, device=self.device)
        x = torch.zeros(n, self.seq_len, dtype=torch.long, device=self.device)
        return self.complete(x, keep, generator, use_cache=use_cache)

    def sample_flops(self, use_cache: bool | None = None) -> int:
        """Model FLOPs of one image of sample() (priors/flops.py): L decoder calls; None = the cached path."""
        return decoder_sample_flops(self.model.cfg, self.seq_len, use_cache is not False)

    def complete(self, x: torch.Tensor, keep_mask: torch.Tensor, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """The AR baseline of ImageBART Fig. 5: walk positions in raster order, keep the kept
        tokens (feeding them as context) and sample the others from what precedes them only.
        It cannot look ahead, so kept tokens after a generated position do not inform it.
        """
        x = x.to(self.device)
        keep = keep_mask.to(self.device, torch.bool)
        if x.shape != keep.shape or x.shape[1] != self.seq_len:
            raise ValueError(f"x {tuple(x.shape)} and keep_mask {tuple(keep.shape)} must both be (B, {self.seq_len})")
        out = x.clone()
        span = generated_span(keep, self.seq_len)
        if span is None:
            return out
        first, last = span[0], span[1] - 1
        gen = (~keep).any(dim=0)  # (L,) positions that some row generates
        # Read on the host once, not once per step (a per-step read would sync with a GPU every token).
        gen_at, mixed_at = gen.tolist(), (gen & keep.any(dim=0)).tolist()
        start = torch.full_like(out[:, :1], self.start_id)  # (B, 1)
        compiled_step = self.compile_mode == "on"
        step = compiled(decode_logits) if compiled_step else decode_logits
        # The cached loop's steps are too small for several CPU threads; the uncached one runs whole prefixes.
        threads = decode_threads(self.device) if use_cache else contextlib.nullcontext()
        with eval_mode(self), torch.no_grad(), threads:
            cache = self.model.new_cache() if use_cache else None
            prev = None  # (B,) the tokens at position i - 1, fed to the cached step at position i
            for i in range(first, last + 1):
                if not use_cache:
                    logits = self.model(torch.cat([start, out[:, :i]], dim=1))[:, -1]  # (B, V)
                elif i == first:
                    # Every row keeps positions < first: read them in one call; nothing after `last` is generated.
                    logits = self.model(torch.cat([start, out[:, :first]], dim=1), cache=cache)[:, -1]  # (B, V)
                    positions = cache.layers[0].positions  # arange(L) on the device: the static step's positions
                else:
                    # One new position per call, written into the preallocated cache. The compiled step takes
                    # its position as a tensor (one graph for every step), the eager one as an int.
                    logits = step(self.model, prev[:, None], cache, positions[i:i + 1] if compiled_step else i)
                if gen_at[i]:
                    tok = self._next(logits, generator)  # (B,)
                    prev = torch.where(keep[:, i], x[:, i], tok) if mixed_at[i] else tok
                    out[:, i] = prev
                else:
                    prev = out[:, i].contiguous()  # kept by every row
        return out

    def nfe(self) -> int:
        return self.seq_len  # one call per token for sample(); complete() makes at most as many

    def completion_nfe(self, keep_mask: torch.Tensor) -> int:
        """complete() makes one call per position from the first to the last one any row generates."""
        span = generated_span(keep_mask, self.seq_len)
        return 0 if span is None else span[1] - span[0]
