"""The priors behind one interface (priors.base.Prior), by the name a config uses.

A prior defined elsewhere (a user's own, or a test's) needs no entry here: its conf/prior/NAME.yaml names
its class as `class: package.module:ClassName`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from priors.absorbing import AbsorbingPrior
from priors.ar import ARPrior
from priors.base import NLL, PRESET_SIZE_OPTIONS, Prior
from priors.imagebart import ImageBARTPrior
from priors.options import import_class

# name -> class; this order is the order error messages and sweeps list them in
PRIORS: dict[str, type[Prior]] = {"ar": ARPrior, "absorbing": AbsorbingPrior, "imagebart": ImageBARTPrior}
CLASS_KEY = "class"  # option naming a prior class outside this package: "package.module:ClassName"


def prior_class(name: str, cfg: Mapping[str, Any] | None = None) -> type[Prior]:
    """The class of prior `name`: the registry's, or the one its config names under `class`."""
    target = (cfg or {}).get(CLASS_KEY)
    if target:
        return import_class(target, Prior, f"prior.{CLASS_KEY}")
    if name not in PRIORS:
        raise ValueError(f"prior={name} is not one of: {', '.join(PRIORS)}")
    return PRIORS[name]


def build_prior(name: str, vocab_size: int, grid: tuple[int, int], T: int, budget: int,
                cfg: Mapping[str, Any]) -> Prior:
    """The prior `name` sized to `budget` parameters.

    cfg is the prior's Hydra config group (conf/prior/NAME.yaml) without `name`; a `name`
    key equal to `name` is tolerated. Keys under `sample:` are sampling-only. Of PRESET_SIZE_OPTIONS, only
    those the prior declares in `size_options` are passed on.
    """
    cls = prior_class(name, cfg)
    # A preset's size options reach only the priors that have them (Prior.size_options).
    cfg = {k: v for k, v in cfg.items()
           if k != CLASS_KEY and (k not in PRESET_SIZE_OPTIONS or k in cls.size_options)}
    given = cfg.pop("name", name)
    if given != name:
        raise ValueError(f"prior={name} was given the config of prior {given}")
    return cls.from_budget(vocab_size, grid, budget=budget, T=T, **cfg)


__all__ = ["PRIORS", "build_prior", "prior_class", "Prior", "NLL", "ARPrior", "ImageBARTPrior", "AbsorbingPrior"]
