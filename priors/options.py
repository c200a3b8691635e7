"""A prior's options as dataclasses, built from its config (conf/prior/NAME.yaml) by one helper (which the
tokenizer's `model:` and `train:` blocks use too).

Each prior keeps its architecture in a small dataclass (a comment per field, like nanoGPT's GPTConfig) whose
`asdict` is arch_config(), stored in every checkpoint so that `Prior(**arch_config())` rebuilds the same modules;
its sampling-only settings (the `sample:` block) are a second dataclass. `options_from` fills either from a
config mapping: an unknown key or a value of the wrong type is a one-line ValueError naming the option as the
config spells it (`prior.KEY`, `prior.sample.KEY`). Ranges are checked in each dataclass's __post_init__, so a
prior built directly (tests, a checkpoint) is checked the same way.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

from priors.transformer import TransformerConfig, check_sampling, count_params, fit_d_model

C = TypeVar("C")


def options_from(cls: type[C], options: Mapping[str, Any] | None, prefix: str, *, owner: str,
                 others: tuple[str, ...] = (), group: str = "prior", **derived: Any) -> C:
    """cls(**options, **derived), each option checked against its field's type (an int is a valid float).

    prefix: how the config spells the block ("prior", "prior.sample"); owner: the option the block belongs to, as
    `group=owner` in messages (prior=ar; the tokenizer's blocks: group="tokenizer", owner="vqgan").
    others: option names of the same block that the caller reads itself (e.g. "sample"): skipped, but listed.
    derived: fields the caller sets (vocabulary, grid, T, the fitted width): a config that gives them is refused.
    """
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{prefix}={options!r}: expected a mapping of options")
    known = [f.name for f in dataclasses.fields(cls) if f.name not in derived] + list(others)
    for key in options:
        if key not in known:
            raise ValueError(f"{prefix}.{key} is not an option of {group}={owner} (options: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    values = {key: _typed(f"{prefix}.{key}", value, hints[key]) for key, value in options.items()
              if key not in others}
    return cls(**values, **derived)


def _typed(option: str, value: Any, hint: Any) -> Any:
    """value checked against a field type: bool, int, float (an int becomes a float), str, X | None; others pass."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{option}={value!r}: expected true or false")
    if hint is int or hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float) if hint is float else int):
            raise ValueError(f"{option}={value!r}: expected {'a number' if hint is float else 'an integer'}")
        return float(value) if hint is float else value
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{option}={value!r}: expected a string")
    return value


def check_transformer(n_layer: int, n_head: int, dropout: float) -> None:
    """The options every prior's transformers share."""
    if n_layer < 1:
        raise ValueError(f"prior.n_layer={n_layer} must be >= 1")
    if n_head < 1:
        raise ValueError(f"prior.n_head={n_head} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"prior.dropout={dropout} must lie in [0, 1)")


@dataclass
class TransformerPriorConfig:
    """The architecture of a prior that is one transformer over V codes plus one special input id V (AR's start,
    absorbing's mask); subclasses say whether it is causal and add their own fields."""
    causal: ClassVar[bool]  # causal self-attention (AR) or bidirectional (absorbing); not a field
    vocab_size: int  # V = K_eff codes
    grid: list[int]  # [H, W]: L = H*W raster-ordered tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads; d_model is a multiple of it
    d_model: int = 0  # width D; from_budget fits it to budget.params (0 until then)
    dropout: float = 0.0  # dropout while training

    def __post_init__(self) -> None:
        self.grid = list(self.grid)  # a list, as a checkpoint stores it
        check_transformer(self.n_layer, self.n_head, self.dropout)

    def transformer_config(self) -> TransformerConfig:
        # Inputs: V codes + the special id; outputs: the V codes only (the special id is never predicted).
        return TransformerConfig(vocab_in=int(self.vocab_size) + 1, vocab_out=int(self.vocab_size),
                                 seq_len=int(self.grid[0]) * int(self.grid[1]), n_layer=int(self.n_layer),
                                 n_head=int(self.n_head), d_model=int(self.d_model), causal=self.causal,
                                 dropout=float(self.dropout))


def fit_arch(cls: type[C], options: Mapping[str, Any], vocab_size: int, grid: tuple[int, int], budget: int, *,
             owner: str, others: tuple[str, ...] = ()) -> C:
    """The architecture cls (a TransformerPriorConfig) from a prior's options, with the width d_model whose
    parameter count is closest to budget (fit_d_model)."""
    arch = options_from(cls, options, "prior", owner=owner, others=others, vocab_size=int(vocab_size),
                        grid=[int(grid[0]), int(grid[1])], d_model=0)
    what = f"prior={owner} with n_layer={arch.n_layer}, V={arch.vocab_size}, L={arch.grid[0] * arch.grid[1]}"
    d_model = fit_d_model(int(budget), lambda d: count_params(replace(arch, d_model=d).transformer_config()),
                          arch.n_head, what=what)
    return replace(arch, d_model=d_model)


@dataclass
class LogitSampling:
    """The `sample:` block of a prior that draws every token from its softmax (transformer.sample_logits)."""
    temperature: float = 1.0  # logits are divided by it before sampling
    top_k: int | None = None  # keep only the k most likely ids per step; None = all
    top_p: float | None = None  # nucleus: keep the smallest set of ids with mass >= top_p; None = all

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)


def import_class(target: Any, base: type, option: str) -> type:
    """The class a config names as "package.module:ClassName" (option: how the config spells it, for messages);
    it must subclass `base`. A one-line ValueError otherwise."""
    module, _, attr = str(target).partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{option}={target}: cannot import it ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{option}={target} is not a {base.__module__}.{base.__name__} subclass")
    return cls
