"""Absorbing (masking) discrete diffusion prior, as in Unleashing Transformers
(Bond-Taylor et al., ECCV 2022), over the shared VQGAN tokens.

One bidirectional transformer reads a token grid x_t (B, L) in which some tokens
are replaced by the absorbing mask id m = V and predicts p_theta(x_0 | x_t) at
every position (vocab_in = V + 1, vocab_out = V: the mask is never predicted).

Forward process (paper Sec. 3.2). With N = L diffusion steps (the paper uses as
many steps as tokens), x_t masks every token of x_0 independently with
probability t / N, t in 1..N; x_N is all masks.

Training draws t ~ U{1..N} and one mask per sequence, and scores the masked
positions only (the paper predicts x_0 directly rather than x_{t-1}). Two
objectives, each normalised *per token* like the official code
(samb-t/unleashing-transformers, models/absorbing_diffusion.py), so their values
compare across grid sizes L:

* ``elbo`` (Eq. 6): ``N / t * CE_masked / (L ln 2)``, where CE_masked is the
  summed cross-entropy (nats) over masked positions. The factor N = 1 / p(t)
  makes it an unbiased one-sample estimate of the Eq. 6 sum over t, in bits per
  token: its expectation is exactly what `nll` reports.
* ``reweighted_elbo`` (Eq. 7, default): ``(N - t + 1) / N * CE_masked / (L ln 2)``.
  Like the official code we do not multiply by 1 / p(t) = N here, so the value
  stays O(bits per token); its expectation is the Eq. 7 sum divided by N * L ln 2.
  (The official code's "new" loss uses (N - t) / N; we follow the paper's
  (N - t + 1) / N, which also keeps the t = N term.)

Sampling (paper Sec. 4.2, step skipping). T sampling steps, 1 <= T <= L: start
all-masked and unmask a group of positions per step so that all L are unmasked
after exactly T network calls (nfe = T; T = L is the full chain, one token per
step). Group sizes are as even as possible. Two samplers:

* ``random`` (the paper's): the positions to unmask are chosen uniformly at
  random among the masked ones, their tokens drawn from p_theta(x_0 | x_t) with
  temperature. Unlike the official ``sample_v2`` (each masked token unmasked
  independently with probability 1 / t, so group sizes are random) the group
  sizes here are fixed, which makes nfe exactly T.
* ``confidence`` (MaskGIT, Chang et al. 2022): draw a token at every masked
  position, keep the most confident ones (highest probability of the drawn
  token) and re-mask the rest; how many stay masked after step s follows the
  cosine schedule floor(m cos(pi/2 * s/T)). The order depends on the model, so
  this sampler is not the generative model whose ELBO `nll` reports.

Likelihood (`nll`). The number reported is a bound on -log p of the T-step
sampler that is evaluated, at temperature 1 like every prior's NLL (kind
"order_bound", `order_bound`): the random sampler
is a mixture over unmasking orders, and Jensen over the orders bounds it; T = 1
is exact, T = L is the any-order autoregressive bound. The Eq. 6 ELBO goes beside
it (extra["elbo_eq6"]). Eq. 6 (N = L, discrete time) is the exact ELBO of the
paper's reverse chain (Appendix B, Eq. 12; the official ``sample_v2`` with every
step): at step t each masked token is unmasked independently with probability
1/t. It is *not* a bound on the random-order sampler here, even at T = L (one
token per step, a mixture over the L! orders): the two weight masks of k tokens
by sum_t (1/t)(t/N)^k(1 - t/N)^(L-k) versus 1/(k C(L,k)), equal only as N -> inf.
On tiny models Eq. 6 can undercut -log p of the order mixture (tested: it bounds
the chain exactly, and the sampler draws from the order mixture exactly). The
confidence sampler has no tractable likelihood: its NLL is None with the reason.

Completion (paper Sec. 4.3 inpainting): the positions to generate are masked,
their number sets the starting time, and the same sampler denoises them over
min(T, #masked) steps; kept positions are never touched.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from priors.base import NLL, Prior, eval_mode
from priors.flops import encoder_flops
from priors.options import TransformerPriorConfig, fit_arch, options_from
from priors.transformer import Transformer, compiled, draw_categorical, full_logits

LOSSES = ("reweighted_elbo", "elbo")
SAMPLERS = ("random", "confidence")


@dataclass
class AbsorbingConfig(TransformerPriorConfig):
    """The absorbing prior's architecture and objective (arch_config() is its asdict): one bidirectional transformer
    whose special input id V is the mask. The number of sampling steps T, the sampling settings (SampleConfig) and
    the evaluation-only nll_samples are not part of it: one checkpoint serves every T."""
    causal: ClassVar[bool] = False  # bidirectional: every position sees every unmasked token
    loss: str = "reweighted_elbo"  # training objective: reweighted_elbo (Eq. 7, the paper's default) | elbo (Eq. 6)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"prior.loss={self.loss} is not one of: {', '.join(LOSSES)}")


@dataclass
class SampleConfig:
    """The `sample:` block: sampling-only settings, never part of what is trained."""
    sampler: str = "random"  # random (the paper's uniformly random unmasking order) | confidence (MaskGIT)
    temperature: float = 1.0  # logits are divided by it before the softmax

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"prior.sample.sampler={self.sampler} is not one of: {', '.join(SAMPLERS)}")
        if not self.temperature > 0:
            raise ValueError(f"prior.sample.temperature={self.temperature} must be > 0")


def check_nll_samples(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"prior.nll_samples={n!r} must be an integer >= 1 (Monte Carlo draws per sequence)")


class AbsorbingPrior(Prior):
    name = "absorbing"
    label = "Absorbing (Unleashing)"  # how reports name it
    T_applies = "sampling"  # T only sets the number of sampling steps
    eval_only_options = ("sample", "nll_samples")  # nll_samples: Monte Carlo draws of the NLL bounds
    extra_bounds = {"elbo_eq6": "Eq. 6 ELBO"}  # Unleashing's Eq. 6: what the paper reports and `elbo` trains
    validation_keys = ("elbo_bits_per_token",)  # Eq. 6, not the reweighted training loss
    size_options = ("n_layer", "n_head")
    validation_note = "its Eq. 6 ELBO (not the reweighted training loss)"

    def __init__(self, vocab_size: int, grid: tuple[int, int], n_layer: int, n_head: int, d_model: int,
                 dropout: float = 0.0, loss: str = "reweighted_elbo", nll_samples: int = 4,
                 T: int | None = None, sampler: str = "random", temperature: float = 1.0):
        super().__init__(vocab_size, grid)
        self.arch = AbsorbingConfig(vocab_size=self.vocab_size, grid=list(self.grid), n_layer=n_layer,
                                    n_head=n_head, d_model=d_model, dropout=dropout, loss=loss)
        check_nll_samples(nll_samples)
        self.mask_id = self.vocab_size  # the absorbing state m = V; real codes are 0..V-1
        self.n_steps = self.seq_len  # N: diffusion steps in training = number of tokens, as in the paper
        self.loss_type = loss
        self.nll_samples = int(nll_samples)
        self.cfg = self.arch.transformer_config()
        self.model = Transformer(self.cfg)
        self.set_sampling(T=T, sampler=sampler, temperature=temperature)

    # ---- configuration ----------------------------------------------------
    def set_sampling(self, T: int | None = None, sampler: str | None = None,
                     temperature: float | None = None) -> None:
        """Change sampling-only settings (a trained checkpoint is sampled once per T).

        T = None means the full chain, T = L.
        """
        T = self.seq_len if T is None else int(T)
        if T < 1:
            raise ValueError(f"T={T} must be >= 1 sampling step")
        if T > self.seq_len:
            raise ValueError(f"T={T} exceeds the number of tokens L={self.seq_len}: absorbing diffusion "
                             f"unmasks at least one token per step, so it cannot take more steps than tokens")
        self.T = T
        if sampler is not None or temperature is not None:  # None keeps the current setting
            settings = SampleConfig(sampler=self.sampler if sampler is None else sampler,
                                    temperature=self.temperature if temperature is None else temperature)
            self.sampler, self.temperature = settings.sampler, float(settings.temperature)

    def set_eval_options(self, T: int | None, options: Mapping[str, Any]) -> None:
        settings = options_from(SampleConfig, options.get("sample"), "prior.sample", owner=self.name)
        nll_samples = options.get("nll_samples", self.nll_samples)
        check_nll_samples(nll_samples)
        self.nll_samples = int(nll_samples)
        self.set_sampling(T=T, sampler=settings.sampler, temperature=settings.temperature)

    @classmethod
    def from_budget(cls, vocab_size: int, grid: tuple[int, int], budget: int, T: int | None = None, *,
                    sample: Mapping[str, Any] | None = None, nll_samples: int = 4, **options: Any
                    ) -> "AbsorbingPrior":
        """The absorbing prior whose width d_model puts its parameter count closest to `budget`.

        options: those of conf/prior/absorbing.yaml (AbsorbingConfig's fields but the derived vocab_size, grid and
        d_model), the evaluation-only nll_samples and the sampling settings under `sample` (SampleConfig);
        unknown keys and bad values raise a one-line ValueError. T only sets the number of sampling steps
        (None = L); the width does not depend on it.
        """
        settings = options_from(SampleConfig, sample, "prior.sample", owner=cls.name)
        arch = fit_arch(AbsorbingConfig, options, vocab_size, grid, budget, owner=cls.name,
                        others=("nll_samples", "sample"))
        return cls(**asdict(arch), nll_samples=nll_samples, T=T, **asdict(settings))

    def arch_config(self) -> dict[str, Any]:
        # Architecture and training objective only (AbsorbingConfig): one checkpoint serves every T.
        return asdict(self.arch)

    def units(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def nfe(self) -> int:
        return self.T  # one network call per sampling step

    def completion_nfe(self, keep_mask: torch.Tensor) -> int:
        """complete() takes min(T, m) steps, m the most masks in a row (the batch steps together)."""
        m = int((~keep_mask.to(torch.bool).reshape(-1, self.seq_len)).sum(1).max())
        return min(self.T, m)

    # ---- forward process and losses ----------------------------------------
    def sample_time(self, b: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{1..N}, one per sequence: (B,) int64."""
        return torch.randint(1, self.n_steps + 1, (b,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x_0): mask each token independently with probability t / N. Returns (x_t, mask), both (B, L)."""
        u = torch.rand(x0.shape, device=x0.device, generator=generator)  # (B, L)
        mask = u < (t.to(u.dtype) / self.n_steps).unsqueeze(1)  # (B, L)
        return x0.masked_fill(mask, self.mask_id), mask

    def masked_ce(self, x0: torch.Tensor, x_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy -log p_theta(x_0 | x_t) over the masked positions, in nats: (B,)."""
        logits = self.model(x_t)  # (B, L, V)
        ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L)
        return (ce * mask).sum(1)  # (B,)

    def loss_weight(self, t: torch.Tensor, loss: str | None = None) -> torch.Tensor:
        """Per-sequence weight of CE_masked / (L ln 2) for the training objective (see the module docstring)."""
        loss = self.loss_type if loss is None else loss
        t = t.double()
        if loss == "elbo":
            return self.n_steps / t  # Eq. 6, Unleashing Transformers: 1/t, times 1/p(t) = N (unbiased MC over t)
        if loss == "reweighted_elbo":
            return (self.n_steps - t + 1) / self.n_steps  # Eq. 7, Unleashing Transformers: (N - t + 1)/N
        raise ValueError(f"prior.loss={loss} is not one of: {', '.join(LOSSES)}")

    def sequence_losses(self, x0: torch.Tensor, t: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and Eq. 6 ELBO estimate (bits per token) for given t (B,) and mask (B, L): both (B,)."""
        x_t = x0.masked_fill(mask, self.mask_id)  # (B, L)
        ce = self.masked_ce(x0, x_t, mask)  # (B,)
        per_token = ce / (self.seq_len * math.log(2))  # nats summed over masked -> bits per token of the grid
        loss = self.loss_weight(t).to(ce.dtype) * per_token
        elbo = self.loss_weight(t, "elbo").to(ce.dtype) * per_token  # Eq. 6, Unleashing Transformers
        return loss, elbo

    def unit_loss(self, unit: str, x: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        if unit != "model":
            raise ValueError(f"absorbing has one unit 'model', not {unit!r}")
        t = self.sample_time(x.shape[0], x.device, generator)  # (B,)
        _, mask = self.q_sample(x, t, generator)  # (B, L)
        loss, elbo = self.sequence_losses(x, t, mask)
        return loss.mean(), {"loss": loss.mean().item(), "elbo_bits_per_token": elbo.mean().item(),
                             "mask_fraction": float(mask.float().mean())}

    # ---- likelihood ----------------------------------------------------------
    @torch.no_grad()
    def nll(self, x: torch.Tensor, generator: torch.Generator | None = None) -> NLL:
        """Per sequence, bits per token: a bound on -log p(x) of the T-step sampler that `sample` runs, with the
        network's softmax at temperature 1 (prior.sample.temperature changes the samples, never the NLL).

        random sampler: kind "order_bound", an unbiased estimate of the Jensen bound over its unmasking
        orders (order_bound). confidence sampler: None with the reason (its order depends on the model's own
        draws). Either way extra["elbo_eq6"] holds the Eq. 6 ELBO estimate (elbo_eq6) of each sequence.
        """
        with eval_mode(self):
            extra = {"elbo_eq6": self.elbo_eq6(x, generator).cpu()}
            if self.sampler != "random":
                return NLL(per_sequence=None, kind=None, extra=extra,
                           reason="the confidence (MaskGIT) sampler picks positions by the model's own draws: "
                                  "no tractable likelihood")
            return NLL(per_sequence=self.order_bound(x, generator).cpu(), kind="order_bound", extra=extra)

    @torch.no_grad()
    def elbo_eq6(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 6 ELBO of each sequence (B,) in bits per token: the mean of `nll_samples` unbiased one-call
        estimates, each with its own (t, mask) ~ q (the `elbo` training objective's estimator)."""
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for _ in range(self.nll_samples):
            t = self.sample_time(x.shape[0], x.device, generator)  # (B,)
            _, mask = self.q_sample(x, t, generator)  # (B, L)
            total += self.sequence_losses(x, t, mask)[1].double()
        return total / self.nll_samples

    def step_sizes(self, m: int) -> list[tuple[int, int]]:
        """(r_s, g_s) for the steps s = 1..S of the random sampler started from m masks (S = min(T, m)):
        r_s masks before step s, of which it reveals g_s (the same schedule as `_denoise`)."""
        S = min(self.T, m)
        left = [m] + [int(self._remaining(torch.tensor([m]), s, S)) for s in range(1, S + 1)]
        return [(left[s - 1], left[s - 1] - left[s]) for s in range(1, S + 1)]

    @torch.no_grad()
    def order_bound(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unbiased estimate of an upper bound on -log2 p_T(x) / L, p_T the random-order T-step sampler: (B,).

        The sampler (`_denoise`) reveals a uniformly random order of the L positions in groups G_1..G_S of the
        sizes of `step_sizes` and draws every x_i, i in G_s, independently from p(x_i | x_{revealed}) (the
        network's softmax at temperature 1: the harness's NLL rule, the same for every prior, is the model's
        likelihood or bound at temperature 1 whatever prior.sample.temperature is). So p_T(x) = E_order prod_s prod_{i in G_s} p(x_i | ...),
        and by Jensen
            -log p_T(x) <= B_T(x) = E_order [ sum_s sum_{i in G_s} -log p(x_i | x_{G_1 u ... u G_{s-1}}) ].
        T = 1 is exact (one factorised step); T = L is the any-order autoregressive bound.

        Estimator: the mean over `nll_samples` orders of the bracket, each a teacher-forced pass along the
        sampler's own trajectory (S = T network calls per order, the orders batched together). Every token is
        scored exactly once per order, so how hard each token is cancels out of its variance; an estimator of
        one-step draws (all masked tokens of a random step scored) saves calls at large T but needs several times
        more of them for the same variance (docs/design-differences.md, "Absorbing NLL", has the measurement),
        and Monte Carlo noise is what remains in the harness's paired per-sequence differences.
        """
        B, L = x.shape
        K = self.nll_samples
        xs = x.repeat(K, 1)  # (K B, L): one order per row
        rank = torch.rand((K * B, L), device=x.device, generator=generator).argsort(1).argsort(1)  # (K B, L)
        total = torch.zeros(K * B, dtype=torch.float64, device=x.device)
        done = 0  # positions revealed before this step
        for _, g in self.step_sizes(L):
            masked = rank >= done  # (K B, L)
            reveal = masked & (rank < done + g)  # (K B, L): G_s, the next g positions of each order
            logits = self.model(xs.masked_fill(masked, self.mask_id)).float()  # (K B, L, V), temperature 1
            ce = F.cross_entropy(logits.transpose(1, 2), xs, reduction="none").double()  # (K B, L) nats
            total += (ce * reveal).sum(1)
            done += g
        return total.view(K, B).mean(0) / (L * math.log(2))

    @torch.no_grad()
    def exact_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """The Eq. 6 ELBO of each sequence (B,) in bits per token, exactly: every mask enumerated, no MC.

        ELBO(x) = sum_M c(|M|) sum_{i in M} -log p_theta(x_i | x with M masked), where
        c(k) = sum_{t=1}^N (1/t) (t/N)^k (1 - t/N)^(L-k) is the probability weight of one mask M with k
        entries under q(x_t | x_0), summed over t with Eq. 6's 1/t. 2^L network calls: tiny L only (tests).
        """
        L, N = self.seq_len, self.n_steps
        if L > 16:
            raise ValueError(f"exact_elbo enumerates 2^L masks; L={L} is too large")
        c = [sum((1 / t) * (t / N) ** k * (1 - t / N) ** (L - k) for t in range(1, N + 1)) for k in range(L + 1)]
        pos = torch.arange(L, device=x.device)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        with eval_mode(self):
            for bits in range(1, 2 ** L):  # the empty mask scores nothing
                mask = ((bits >> pos) & 1).bool().expand_as(x)  # (B, L)
                ce = self.masked_ce(x, x.masked_fill(mask, self.mask_id), mask).double()  # (B,)
                total += c[int(mask[0].sum())] * ce
        return total / (L * math.log(2))

    # ---- sampling --------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.full((n, self.seq_len), self.mask_id, dtype=torch.long, device=self.device)  # (B, L) all masked
        return self._denoise(x, torch.ones_like(x, dtype=torch.bool), generator)

    def sample_flops(self, use_cache: bool | None = None) -> int:
        """Model FLOPs of one image of sample() (priors/flops.py): T bidirectional passes over L tokens
        (there is no cache to use)."""
        return self.T * encoder_flops(self.cfg, self.seq_len)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, keep_mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        masked = ~keep_mask.to(torch.bool)  # (B, L): positions to generate
        x = x.masked_fill(masked, self.mask_id)  # the count of masks sets the starting time (paper Sec. 4.3)
        return self._denoise(x, masked, generator)

    def _denoise(self, x: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Unmask every masked position of x (B, L) in S = min(T, max #masked) network calls."""
        m = masked.sum(1)  # (B,) masks per row at the start
        S = min(self.T, int(m.max()))
        if S == 0:
            return x.clone()
        forward = compiled(full_logits) if self.compile_mode == "on" else full_logits
        with eval_mode(self):
            for s in range(1, S + 1):
                remain = self._remaining(m, s, S)  # (B,) how many stay masked after this step
                logits = forward(self.model, x).float() / self.temperature  # (B, L, V)
                probs = logits.softmax(-1)
                B, L, V = probs.shape
                x_hat = draw_categorical(probs.view(B * L, V), generator).view(B, L)  # (B, L): multinomial's draws
                if self.sampler == "random":
                    score = torch.rand((B, L), device=x.device, generator=generator)  # uniform random order
                else:
                    score = probs.gather(-1, x_hat.unsqueeze(-1)).squeeze(-1)  # (B, L) confidence of the draw
                score = score.masked_fill(~masked, -1.0)  # unmasked positions rank last
                rank = torch.empty_like(x)
                rank.scatter_(1, score.argsort(1, descending=True),
                              torch.arange(L, device=x.device).expand(B, L))  # (B, L): 0 = highest score
                reveal = masked & (rank < (masked.sum(1) - remain).unsqueeze(1))  # (B, L)
                x = torch.where(reveal, x_hat, x)
                masked = masked & ~reveal
        return x

    def _remaining(self, m: torch.Tensor, s: int, S: int) -> torch.Tensor:
        """Masks left after step s of S for rows that started with m (B,) masks; 0 after the last step."""
        if self.sampler == "random":
            # Evenly skipped steps (Sec. 4.2, Tab. 3): group sizes differ by at most one and are >= 1 when m >= S.
            return (m * (S - s)) // S
        # MaskGIT cosine schedule; at least one position revealed per step while any remain, and enough left
        # masked that every later step still reveals one.
        cos = torch.floor(m.double() * math.cos(math.pi / 2 * s / S)).long()
        prev = m if s == 1 else self._remaining(m, s - 1, S)
        return torch.minimum(torch.maximum(cos, torch.clamp(m, max=S - s)), (prev - 1).clamp(min=0))
