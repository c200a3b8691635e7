"""The interface every prior promises (priors/base.py), checked the same way for all three."""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from priors import PRIORS, build_prior
from priors.base import NLL, NLL_KINDS, PRESET_SIZE_OPTIONS, Prior
from priors.flops import sample_flops_per_image
from tests import tolerance as T
from tests.priortools import count_network_calls

V, GRID = 10, (4, 4)
L = GRID[0] * GRID[1]
NAMES = ["ar", "imagebart", "absorbing"]
BENCH = Path(__file__).resolve().parent.parent / "bench"


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name, T=3, budget=40000):
    torch.manual_seed(0)
    return build_prior(name, V, GRID, T=T, budget=budget, cfg={"n_layer": 2, "n_head": 2})


def batch(n=6, seed=0):
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_every_unit_loss_is_finite_and_reaches_only_its_unit(name):
    prior = make(name)
    for unit, module in prior.units().items():
        prior.zero_grad(set_to_none=True)
        loss, logs = prior.unit_loss(unit, batch(), generator=torch.Generator().manual_seed(1))
        assert loss.dim() == 0 and math.isfinite(loss.item())
        assert all(math.isfinite(v) for v in logs.values())
        loss.backward()
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        others = [p for u, m in prior.units().items() if u != unit for p in m.parameters()]
        assert all(p.grad is None for p in others)


@pytest.mark.parametrize("name", NAMES)
def test_samples_have_the_right_shape_and_range_and_no_special_ids(name):
    prior = make(name)
    x = prior.sample(5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, L) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < V


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_is_reproducible(name):
    prior = make(name)
    a = prior.sample(4, generator=torch.Generator().manual_seed(7))
    b = prior.sample(4, generator=torch.Generator().manual_seed(7))
    c = prior.sample(4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_nll_is_per_sequence_bits_per_token(name):
    prior = make(name)
    r = prior.nll(batch(), generator=torch.Generator().manual_seed(0))
    assert isinstance(r, NLL) and r.kind in NLL_KINDS and r.reason is None
    v = r.per_sequence
    assert v.shape == (6,) and v.dtype == torch.float64 and v.device.type == "cpu"
    assert torch.isfinite(v).all()
    # An untrained model is close to uniform: neither -log2 p nor a bound is far below log2(V) bits.
    assert (v > 0.5 * math.log2(V)).all()
    for key, e in r.extra.items():
        assert e.shape == (6,) and e.dtype == torch.float64 and torch.isfinite(e).all(), key
    # The same rows in another order give the same values in that order (exactly for exact kinds; the
    # Monte Carlo ones are checked per sequence against enumerated bounds in their own test modules).
    if r.kind == "exact":
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        # Another row order may round differently (float32 transformers; d_model <= sqrt(budget) whatever the
        # prior): per token, log-softmax moves by at most twice the logits' error, and the logits that matter
        # (shift-invariant) spread by at most a token's own -log p <= L v ln 2. Two routes, in bits.
        rel = T.transformer_error(math.isqrt(40000), 2, L)
        token = 2 * rel * L * float(v.max()) * math.log(2) + T.log_softmax_error(torch.zeros(1, V))
        torch.testing.assert_close(prior.nll(batch()[perm]).per_sequence, v[perm], rtol=0,
                                   atol=2 * token / math.log(2))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mask", ["upper_half", "random", "all_kept", "none_kept"])
def test_nfe_and_completion_nfe_count_the_network_calls(name, mask):
    prior = make(name, T=4)
    calls = count_network_calls(prior)
    prior.sample(3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == prior.nfe()
    if mask == "upper_half":
        keep = (torch.arange(L) >= L // 2).expand(5, L).clone()
    elif mask == "random":
        keep = torch.rand(5, L, generator=torch.Generator().manual_seed(4)) < 0.5
    else:
        keep = torch.full((5, L), mask == "all_kept")
    calls.clear()
    prior.complete(batch(5, seed=3), keep, generator=torch.Generator().manual_seed(0))
    assert len(calls) == prior.completion_nfe(keep)
    assert prior.completion_nfe(keep[:1].expand(7, L)) == prior.completion_nfe(keep[0])  # batch size is free
    if mask == "all_kept":
        assert not calls


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mask", ["upper_half", "random"])
def test_completion_never_changes_kept_positions(name, mask):
    prior = make(name)
    x = batch(5, seed=3)
    if mask == "upper_half":
        keep = (torch.arange(L) >= L // 2).expand(5, L).clone()
    else:
        keep = torch.rand(5, L, generator=torch.Generator().manual_seed(4)) < 0.5
    out = prior.complete(x, keep, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and int(out.min()) >= 0 and int(out.max()) < V
    assert torch.equal(out[keep], x[keep])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [400_000, 2_000_000, 20_000_000])
@pytest.mark.parametrize("T", [2, 3, 5, 9])
def test_parameter_count_within_ten_percent_of_budget(name, budget, T):
    with torch.device("meta"):
        prior = build_prior(name, 256, (8, 8), T=T, budget=budget, cfg={"n_layer": 2, "n_head": 4})
    assert abs(prior.num_params() - budget) <= 0.1 * budget


@pytest.mark.parametrize("name", NAMES)
def test_a_budget_too_small_is_a_one_line_error_naming_the_option(name):
    with pytest.raises(ValueError, match=r"^budget.params=5000 is too small") as e:
        with torch.device("meta"):
            build_prior(name, 256, (8, 8), T=9, budget=5000, cfg={"n_layer": 2, "n_head": 4})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_arch_config_rebuilds_the_same_modules(name):
    prior = make(name)
    rebuilt = PRIORS[name](**prior.arch_config())
    assert rebuilt.arch_config() == prior.arch_config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in prior.state_dict().items()}
    assert rebuilt.nfe() >= 1 and prior.num_params() == rebuilt.num_params()


# ---- what the harness reads from a prior, declared on priors.base.Prior -------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_extra_bounds_are_the_declared_ones(name):
    prior = make(name)
    r = prior.nll(batch(), generator=torch.Generator().manual_seed(0))
    assert set(r.extra) == set(prior.extra_bounds)
    assert all(isinstance(label, str) and label for label in prior.extra_bounds.values())


@pytest.mark.parametrize("name", NAMES)
def test_every_unit_logs_its_declared_validation_value(name):
    prior = make(name)
    assert prior.validation_keys and prior.validation_note
    for unit in prior.units():
        loss, logs = prior.unit_loss(unit, batch(), generator=torch.Generator().manual_seed(1))
        present = [k for k in prior.validation_keys if k in logs]
        assert present, (unit, sorted(logs))
        assert prior.validation_bits(loss, logs) == logs[present[0]]


def test_validation_bits_is_the_first_declared_key_else_the_loss_in_bits():
    from tests.toy_prior import ToyPrior

    toy = ToyPrior(V, GRID)
    loss = torch.tensor(2.0)
    assert toy.validation_bits(loss, {}) == pytest.approx(2.0 / math.log(2), rel=1e-15)
    assert toy.validation_bits(loss, {"bits_per_token": 1.25, "other": 9.0}) == 1.25


@pytest.mark.parametrize("name", NAMES)
def test_sample_flops_are_declared_and_counted(name):
    prior = make(name)
    flops = prior.sample_flops()
    assert isinstance(flops, int) and flops > 0
    assert sample_flops_per_image(prior) == float(flops)


def test_a_prior_that_counts_no_flops_reports_none():
    from tests.toy_prior import ToyPrior

    assert sample_flops_per_image(ToyPrior(V, GRID)) is None


def test_construction_from_a_budget_is_part_of_the_interface():
    assert "from_budget" in Prior.__abstractmethods__

    class NoBudget(Prior):  # everything but from_budget
        name = "nobudget"
        units = unit_loss = nll = sample = complete = nfe = completion_nfe = arch_config = lambda self, *a: None

    with pytest.raises(TypeError, match="from_budget"):
        NoBudget(V, GRID)


def test_preset_size_options_reach_only_the_priors_that_have_them():
    from tests.toy_prior import ToyPrior

    preset = {"n_layer": 3, "n_head": 2}  # what an experiment preset sets under prior: for every prior
    toy = build_prior("toy", V, GRID, T=2, budget=1000, cfg={"class": "tests.toy_prior:ToyPrior", **preset})
    assert isinstance(toy, ToyPrior) and not ToyPrior.size_options
    for name in NAMES:
        assert set(PRIORS[name].size_options) == set(PRESET_SIZE_OPTIONS)
    assert build_prior("ar", V, GRID, T=2, budget=40000, cfg=preset).arch_config()["n_layer"] == 3


def test_bench_prose_names_no_prior():
    """String constants under bench/ (docstrings aside) never name a prior family: report prose comes from what
    the priors declare."""
    family = re.compile(r"ImageBART|[Aa]bsorbing|Unleashing|\bAR\b|Taming")
    found = []
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{path.name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str) and id(n) not in docs and family.search(n.value)]
    assert not found, found


EVAL_OPTIONS = {"ar": ({"sample": {"temperature": 0.7, "top_k": 4, "top_p": 0.9}}, 3),
                "imagebart": ({"sample": {"temperature": 0.7, "top_k": 4, "completion_passes": 1}}, 3),
                "absorbing": ({"sample": {"sampler": "confidence", "temperature": 0.7}, "nll_samples": 2}, 5)}


@pytest.mark.parametrize("name", NAMES)
def test_eval_options_set_after_construction_equal_them_at_construction(name):
    """A release's prior gets conf/prior's evaluation-only options with set_eval_options: the same samples,
    completions and NLL, draw for draw, as a prior built with them (same weights, same generator)."""
    options, T = EVAL_OPTIONS[name]
    built = build_prior(name, V, GRID, T=T, budget=40000, cfg={"n_layer": 2, "n_head": 2, **options})
    later = build_prior(name, V, GRID, T=T, budget=40000, cfg={"n_layer": 2, "n_head": 2})
    later.load_state_dict(built.state_dict())
    later.set_eval_options(T, options)
    x, keep = batch(4), torch.arange(L).expand(4, L) < L // 2

    def draws(p):
        g = torch.Generator().manual_seed(3)
        nll = p.nll(x, generator=g)  # the confidence sampler has no bound: per_sequence None, its reason set
        return [p.sample(4, generator=g), p.complete(x, keep, generator=g), nll.kind, nll.reason,
                nll.per_sequence, *nll.extra.values()]

    for a, b in zip(draws(built), draws(later), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    with pytest.raises(ValueError, match="prior.sample.temperature"):
        later.set_eval_options(T, {"sample": {"temperature": -1.0}})


def test_a_chain_keeps_its_length():
    prior = make("imagebart", T=3)
    with pytest.raises(ValueError, match="T=4: this chain has T=3"):
        prior.set_eval_options(4, {})
