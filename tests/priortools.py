"""Test helpers shared by the prior test modules."""
from __future__ import annotations

import itertools

import torch

from priors.transformer import Transformer


def all_sequences(V: int, L: int) -> torch.Tensor:
    """Every sequence of length L over V tokens, (V^L, L): exact likelihoods by enumeration."""
    return torch.tensor(list(itertools.product(range(V), repeat=L)), dtype=torch.long)


def count_network_calls(prior) -> list[int]:
    """One entry per network call: a full forward of any transformer (hook) or a one-token cached decode
    step (a counting wrapper on the instance's `decode`, which the KV-cached samplers call directly)."""
    calls: list[int] = []

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        return wrapped

    for m in prior.modules():
        if isinstance(m, Transformer):
            m.register_forward_hook(lambda *a: calls.append(1))
            if hasattr(m, "decode"):
                m.decode = counting(m.decode)
    return calls
