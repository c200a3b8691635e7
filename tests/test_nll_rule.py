"""The one NLL rule of every prior: the likelihood (or its bound) of the model at temperature 1, without top-k or
top-p truncation; the sampling settings change the samples, never the NLL column."""
import pytest
import torch

from priors import build_prior

V, GRID = 6, (2, 3)
SAMPLING = {  # settings far from temperature 1 with every truncation a prior offers
    "ar": {"temperature": 0.3, "top_k": 2, "top_p": 0.5},
    "imagebart": {"temperature": 0.3, "top_k": 2, "top_p": 0.5},
    "absorbing": {"temperature": 0.3},
}


def nll_under(name: str, sample: dict) -> torch.Tensor:
    torch.manual_seed(0)  # the same weights whatever the sampling settings
    prior = build_prior(name, V, GRID, T=3, budget=60_000, cfg={"n_layer": 2, "n_head": 2, "sample": sample})
    x = torch.randint(V, (8, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(1))
    res = prior.nll(x, torch.Generator().manual_seed(2))
    assert res.kind is not None and res.reason is None
    return res.per_sequence


@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_nll_does_not_move_with_the_sampling_settings(name):
    at_one = nll_under(name, {"temperature": 1.0})
    sampled = nll_under(name, SAMPLING[name])
    # The same computation on the same weights, inputs and noise: equal to the bit, not within a tolerance.
    assert torch.equal(at_one, sampled)
    assert torch.isfinite(at_one).all() and (at_one > 0).all()
