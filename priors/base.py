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
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn


def generated_span(keep_mask: torch.Tensor, seq_len: int) -> tuple[int, int] | None:
    """(first, stop) of the positions that some row generates (~keep_mask), stop exclusive; None if no row
    generates any. A raster-order decoder computes exactly these positions: none after the last one can
    influence it."""
    todo = (~keep_mask.to(torch.bool).reshape(-1, seq_len)).any(dim=0).nonzero().flatten()
    return None if todo.numel() == 0 else (int(todo[0]), int(todo[-1]) + 1)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then restore the caller's train/eval mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


NLL_KINDS = ("exact", "elbo", "order_bound")  # what NLL.per_sequence is (see NLL)
# Size options that experiment presets (conf/experiment/*.yaml) set under `prior:` whatever the prior; a prior
# receives those it declares in Prior.size_options.
PRESET_SIZE_OPTIONS = ("n_layer", "n_head")


@dataclass(frozen=True)
class NLL:
    """Bits per token of each held-out sequence, in the order of the input rows.

    The harness takes the mean, its standard error over sequences (std / sqrt(n) of these values, which holds
    the Monte Carlo variance too, so it means the same for every prior) and paired per-sequence differences
    between priors on the same tokens. Kinds: "exact" -log2 p(x) / L; "elbo" a variational bound (an unbiased
    estimate of it); "order_bound" the Jensen bound over the unmasking orders of an order-mixture sampler.
    """
    per_sequence: torch.Tensor | None  # (B,) float64 on CPU: bits per token of each sequence: exact -log2 p(x)/L, or an unbiased Monte Carlo estimate of an upper bound; None when no bound is tractable
    kind: str | None                   # "exact" | "elbo" | "order_bound"; None when per_sequence is None
    reason: str | None = None          # one line: why per_sequence is None
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)  # other per-sequence bounds (B,), by the names Prior.extra_bounds declares


class Prior(nn.Module, abc.ABC):
    """Everything the harness needs from a prior is declared here; bench/ never tests a prior's name.

    Construction: `from_budget` (the width that fits budget.params). Evaluation: `nll`, `sample`, `complete`,
    `nfe`, `completion_nfe`, `sample_flops`, `set_eval_options` (a release's prior). Reporting: `label`, `T_applies`, `extra_bounds`, `validation_keys`,
    `validation_note`. Caching: `eval_only_options`, `arch_config`.
    """

    name: ClassVar[str]
    label: ClassVar[str] = ""  # how reports name the prior (e.g. "AR (Taming)"); empty: its name
    # How T applies (the harness, cache keys and report read this; they never test a prior's name):
    #   "none"     T is ignored: one training and one evaluation serve every T (AR)
    #   "training" T changes the trained model (ImageBART's chain length)
    #   "sampling" T only changes sampling/evaluation: trained once, evaluated per T (absorbing's steps)
    T_applies: ClassVar[str] = "none"
    # Options of conf/prior/NAME.yaml that only affect sampling or evaluation: left out of the train key.
    eval_only_options: ClassVar[tuple[str, ...]] = ("sample",)
    # Per-sequence bounds that nll() returns besides its main value (NLL.extra), by name -> how reports title
    # them; results.json carries each as bench.keys.bound_key(name) with its interval.
    extra_bounds: ClassVar[Mapping[str, str]] = {}
    # Keys of unit_loss's logs that hold a unit's validation value in bits per token, the first one present
    # wins (checkpoint selection and the report's training table); empty: the loss itself, nats -> bits.
    validation_keys: ClassVar[tuple[str, ...]] = ()
    # One sentence for reports: what a unit's validation value is, and what the sum over the units means.
    validation_note: ClassVar[str] = ""
    # Which of PRESET_SIZE_OPTIONS this prior has. An experiment preset sets those for whatever prior runs;
    # build_prior passes a prior only the ones it declares here.
    size_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, vocab_size: int, grid: tuple[int, int]):
        super().__init__()
        self.vocab_size = int(vocab_size)  # V = K_eff
        self.grid = (int(grid[0]), int(grid[1]))
        self.seq_len = self.grid[0] * self.grid[1]  # L

    # ---- construction ---------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_budget(cls, vocab_size: int, grid: tuple[int, int], budget: int, T: int | None = None,
                    **options: Any) -> "Prior":
        """The prior sized to `budget` trainable parameters. options: conf/prior/NAME.yaml without `name`
        (sampling settings under `sample`); an unknown option or a bad value raises a one-line ValueError."""

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
        """-log2 p(x) / L of each held-out sequence x (B, L), or an upper bound on it (see NLL)."""

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
    def completion_nfe(self, keep_mask: torch.Tensor) -> int:
        """Network evaluations one call of complete() makes for keep_mask ((B, L), or (L,) for one row), per
        batch whatever its size: a batch whose rows all share one mask costs what a single row does."""

    @abc.abstractmethod
    def arch_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this prior's modules; stored in every checkpoint."""

    def set_eval_options(self, T: int | None, options: Mapping[str, Any]) -> None:
        """Apply conf/prior's evaluation-only options (`eval_only_options`: the `sample` block and the like) and T
        where it applies to sampling, to a prior whose weights were made elsewhere (a release): the options a
        trained prior gets from `from_budget`. Options outside eval_only_options are not read; a bad value is a
        one-line ValueError naming it. A prior that cannot be loaded from a release need not implement it."""
        raise NotImplementedError(f"prior={self.name} takes its evaluation options only at construction")

    def sample_flops(self, use_cache: bool | None = None) -> int | None:
        """Model FLOPs one image of sample() costs, counted from the architecture (priors/flops.py's convention);
        None when the prior does not count them (the report then shows no % peak). use_cache: None = the path
        sample() takes; False / True = the uncached / cached decoder path where a prior has both."""
        return None

    def validation_bits(self, loss: torch.Tensor, logs: Mapping[str, float]) -> float:
        """A unit's validation value in bits per token from one unit_loss call: the first of validation_keys
        in its logs, else the loss (nats per token) in bits."""
        for key in self.validation_keys:
            if key in logs:
                return float(logs[key])
        return float(loss) / math.log(2)

    def num_params(self) -> int:
        """Trainable transformer parameters, the quantity budget.params constrains."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- compiled sampling -----------------------------------------------
    compile_mode: str = "off"  # set_compile's mode; a class default, so subclasses need not initialise it

    def set_compile(self, mode: str) -> None:
        """Run sample()'s network calls through torch.compile ("on") or eagerly ("off", the default).

        The first sample() after "on", for each batch size, compiles (tens of seconds on a CPU): make it
        a warm-up call outside the timed sampling. Samples equal the eager ones up to float rounding
        (tests/test_sampling_paths.py); a prior without a compiled path samples eagerly either way.
        """
        if mode not in ("off", "on"):
            raise ValueError(f"compile mode {mode!r} is not one of: off, on")
        self.compile_mode = mode
