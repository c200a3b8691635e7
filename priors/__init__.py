"""The priors behind one interface (priors.base.Prior), by the name a config uses.

ImageBART and absorbing diffusion are imported on first use, so `import priors`
and the AR prior never depend on (or pay the import of) the other modules.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from priors.ar import ARPrior
from priors.base import NLL, Prior

# name -> (module, class); this order is the order error messages and sweeps list them in
_LOCATIONS = {
    "ar": ("priors.ar", "ARPrior"),
    "absorbing": ("priors.absorbing", "AbsorbingPrior"),
    "imagebart": ("priors.imagebart", "ImageBARTPrior"),
}


class _Registry(Mapping):
    """name -> Prior subclass, importing each module the first time its name is looked up."""

    def __getitem__(self, name: str) -> type[Prior]:
        module, cls = _LOCATIONS[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_LOCATIONS)

    def __len__(self) -> int:
        return len(_LOCATIONS)


PRIORS: Mapping[str, type[Prior]] = _Registry()


def __getattr__(attr: str):  # `from priors import ImageBARTPrior` also imports lazily
    for name, (_, cls) in _LOCATIONS.items():
        if cls == attr:
            return PRIORS[name]
    raise AttributeError(f"module 'priors' has no attribute {attr!r}")


def build_prior(name: str, vocab_size: int, grid: tuple[int, int], T: int, budget: int,
                cfg: Mapping[str, Any]) -> Prior:
    """The prior `name` sized to `budget` parameters.

    cfg is the prior's Hydra config group (conf/prior/NAME.yaml) without `name`; a `name`
    key equal to `name` is tolerated. Keys under `sample:` are sampling-only.
    """
    if name not in _LOCATIONS:
        raise ValueError(f"prior={name} is not one of: {', '.join(_LOCATIONS)}")
    cfg = dict(cfg)
    given = cfg.pop("name", name)
    if given != name:
        raise ValueError(f"prior={name} was given the config of prior {given}")
    return PRIORS[name].from_budget(vocab_size, grid, budget=budget, T=T, **cfg)


__all__ = ["PRIORS", "build_prior", "Prior", "NLL", "ARPrior"]
