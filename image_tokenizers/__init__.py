"""The tokenizers behind one interface (image_tokenizers.base.Tokenizer), by the name a config uses.

Not called `tokenizers`: HuggingFace's package of that name (installed with transformers) sits in site-packages,
which Python searches before an editable install, so it would shadow this one.

conf/tokenizer/NAME.yaml picks a class by `name:`; a tokenizer defined elsewhere (a user's own, or a test's)
needs no entry here: its yaml names the class as `class: package.module:ClassName`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from priors.options import import_class, options_from
from image_tokenizers.base import CLASS_KEY, NAME_KEY, TOKENS_OPTIONS, Tokenizer, TokensOptions
from image_tokenizers.release import ReleaseTokenizer
from image_tokenizers.taming import TamingTokenizer
from image_tokenizers.vqgan import VQGANTokenizer

# name -> class; this order is the order error messages list them in
TOKENIZERS: dict[str, type[Tokenizer]] = {"vqgan": VQGANTokenizer, "taming": TamingTokenizer,
                                          "release": ReleaseTokenizer}


def tokenizer_class(config: Mapping[str, Any]) -> type[Tokenizer]:
    """The class of a tokenizer's yaml: the one `class` names, else the registry's entry for `name`."""
    target = config.get(CLASS_KEY)
    if target:
        return import_class(target, Tokenizer, f"tokenizer.{CLASS_KEY}")
    name = config.get(NAME_KEY)
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer.{NAME_KEY}={name} is not one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]


def build_tokenizer(config: Mapping[str, Any], resolution: int) -> tuple[Tokenizer, TokensOptions]:
    """The tokenizer of a conf/tokenizer yaml (a plain mapping, resolved) for images of side `resolution`, and
    the tokens stage's options; any bad option is a one-line ValueError naming it."""
    cls = tokenizer_class(config)
    own = {k: v for k, v in config.items() if k not in (NAME_KEY, CLASS_KEY)}
    missing = [k for k in TOKENS_OPTIONS if k not in own]
    if missing:
        raise ValueError(f"tokenizer.{missing[0]} is required (every conf/tokenizer yaml sets it)")
    tokens = options_from(TokensOptions, {k: own[k] for k in TOKENS_OPTIONS if k in own}, "tokenizer",
                          owner=cls.name, group="tokenizer")
    return cls.from_config(own, resolution), tokens


__all__ = ["TOKENIZERS", "Tokenizer", "TokensOptions", "build_tokenizer", "tokenizer_class", "ReleaseTokenizer",
           "TamingTokenizer", "VQGANTokenizer"]
