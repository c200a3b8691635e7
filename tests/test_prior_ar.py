"""The AR prior: exact NLL by enumeration, cached == uncached sampling, filters, completion, registry."""
import itertools
import math

import pytest
import torch

import priors
from priors import PRIORS, build_prior
from priors.ar import ARPrior
from priors.transformer import filter_logits
from tests import tolerance as T
from tests.priortools import count_network_calls


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab_size=5, grid=(2, 3), seed=0, scale=0.5, **kw):
    torch.manual_seed(seed)
    prior = ARPrior(vocab_size, grid, n_layer=2, n_head=2, d_model=16, **kw)
    # Weights far from the 0.02 init, so the conditionals are far from uniform and bugs show.
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0.0, scale)
    return prior


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_start_id_is_derived_from_the_vocabulary():
    prior = tiny(vocab_size=7)
    assert prior.start_id == 7
    assert prior.model.cfg.vocab_in == 8 and prior.model.cfg.vocab_out == 7
    assert prior.nfe() == 6 and list(prior.units()) == ["model"]


def test_exact_nll_matches_brute_force_enumeration():
    """V=3, L=3: p over all 27 sequences sums to 1, and nll == -log2 p / L from a chain rule
    computed independently (one uncached forward per prefix)."""
    prior = tiny(vocab_size=3, grid=(1, 3), scale=0.8).eval()
    seqs = torch.tensor(list(itertools.product(range(3), repeat=3)))  # (27, 3)
    bits = torch.cat([prior.nll(s[None]).per_sequence for s in seqs])  # (27,) one sequence at a time
    p = 2.0 ** (-bits * 3)
    # Each token's float32 log-probability within `token` nats of exact (the network's rounding through
    # log-softmax); a sequence's probability within 3 tokens' error relative, and so is their sum.
    with torch.no_grad():
        logits = prior.model(torch.cat([torch.full((27, 1), prior.start_id), seqs[:, :2]], 1))
    token = T.log_softmax_error(logits, T.transformer_error(16, 2, 3))
    assert p.sum().item() == pytest.approx(1.0, abs=math.expm1(3 * token))
    assert p.max() > 2.0 / 27  # far from uniform, so the sum is a real check
    with torch.no_grad():
        for s, pi in zip(seqs, p):
            chain = 1.0
            for i in range(3):
                inp = torch.cat([torch.tensor([prior.start_id]), s[:i]])[None]  # (1, i + 1)
                chain *= prior.model(inp)[0, -1].double().softmax(-1)[s[i]].item()
            assert pi.item() == pytest.approx(chain, rel=2 * math.expm1(3 * token))  # both routes' errors
    # A batch reports every row, in order; nll is exact.
    batch = prior.nll(seqs)
    assert batch.kind == "exact" and batch.reason is None and not batch.extra
    assert batch.per_sequence.dtype == torch.float64 and batch.per_sequence.device.type == "cpu"
    # Bits per token: a mean of 3 log-probabilities, each batch's within `token` nats of exact.
    per_seq = 2 * token / math.log(2)
    torch.testing.assert_close(batch.per_sequence, bits, rtol=0, atol=per_seq)
    perm = torch.randperm(27, generator=seeded(0))
    torch.testing.assert_close(prior.nll(seqs[perm]).per_sequence, bits[perm], rtol=0, atol=per_seq)


def test_unit_loss_is_the_nll_in_nats_and_trains():
    prior = tiny(vocab_size=4, grid=(2, 3), scale=0.02)
    target = torch.tensor([[3, 1, 0, 2, 2, 1]]).repeat(8, 1)  # (B, L)
    prior.eval()
    loss, logs = prior.unit_loss("model", target)
    # Two forwards of one network (cross-entropy in float32; log-softmax, then a float64 sum): within twice
    # log_softmax_error per token (nats), so per mean too.
    with torch.no_grad():
        logits = prior.logits(target)
    token = T.log_softmax_error(logits, T.transformer_error(16, 2, 6))
    assert loss.item() == pytest.approx(prior.nll(target).per_sequence.mean().item() * math.log(2), rel=0,
                                        abs=2 * token)
    assert logs["bits_per_token"] == pytest.approx(loss.item() / math.log(2))  # one division: 1 ulp << 1e-6
    with pytest.raises(ValueError, match="unit=scale2"):
        prior.unit_loss("scale2", target)
    prior.train()
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-2)
    for _ in range(60):
        loss, _ = prior.unit_loss("model", target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert prior.nll(target).per_sequence.max() < 0.05
    prior.top_k = 1
    assert torch.equal(prior.sample(2, seeded(0)), target[:2])  # greedy decoding reproduces it


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 3}, {"top_p": 0.8}])
def test_cached_sampling_equals_uncached_token_for_token(settings):
    prior = tiny(vocab_size=6, grid=(3, 4), **settings)
    cached = prior.sample(16, seeded(1), use_cache=True)
    uncached = prior.sample(16, seeded(1), use_cache=False)
    assert cached.shape == (16, 12) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    assert 0 <= int(cached.min()) and int(cached.max()) < 6


def test_sampling_is_reproducible_per_generator():
    prior = tiny()
    assert torch.equal(prior.sample(8, seeded(3)), prior.sample(8, seeded(3)))
    assert not torch.equal(prior.sample(8, seeded(3)), prior.sample(8, seeded(4)))


def test_top_k_one_is_greedy():
    prior = tiny(vocab_size=6, grid=(2, 4), top_k=1)
    a, b = prior.sample(4, seeded(0)), prior.sample(4, seeded(99))
    assert torch.equal(a, b)
    greedy = torch.full((4, 0), 0, dtype=torch.long)
    with torch.no_grad():  # independent greedy decode through the full (uncached) forward
        for _ in range(8):
            nxt = prior.logits(torch.cat([greedy, torch.zeros(4, 1, dtype=torch.long)], 1))[:, -1].argmax(-1)
            greedy = torch.cat([greedy, nxt[:, None]], 1)
    assert torch.equal(a, greedy)


@pytest.mark.parametrize("settings", [{"top_k": 2}, {"top_p": 0.6}, {"top_k": 3, "top_p": 0.7}])
def test_filtered_sampling_stays_inside_the_kept_set(settings):
    prior = tiny(vocab_size=8, grid=(2, 3), **settings)
    samples = prior.sample(200, seeded(5))  # (B, L)
    with torch.no_grad():
        kept = torch.isfinite(filter_logits(prior.logits(samples), **settings))  # (B, L, V)
    assert kept.gather(-1, samples[..., None]).all()
    assert not kept.all()  # the filter removed something, so the check above had teeth


def test_first_token_frequencies_follow_the_model():
    prior = tiny(vocab_size=4, grid=(1, 2), temperature=0.8)
    n = 8000
    tokens = prior.sample(n, seeded(6))[:, 0]
    with torch.no_grad():
        p = (prior.model(torch.full((1, 1), prior.start_id))[0, -1].double() / 0.8).softmax(-1)
    freq = torch.bincount(tokens, minlength=4).double() / n
    assert (freq - p).abs().max() < 4 * (0.25 / n) ** 0.5


def test_completion_never_changes_kept_positions():
    prior = tiny(vocab_size=6, grid=(3, 4))
    g = seeded(7)
    x = torch.randint(0, 6, (32, 12), generator=g)
    keep = torch.rand(32, 12, generator=g) < 0.5
    out = prior.complete(x, keep, seeded(8))
    assert torch.equal(out[keep], x[keep])
    assert out.shape == x.shape and 0 <= int(out.min()) and int(out.max()) < 6
    assert not torch.equal(out[~keep], x[~keep])  # something was generated
    assert torch.equal(out, prior.complete(x, keep, seeded(8), use_cache=False))
    assert torch.equal(prior.complete(x, torch.ones_like(keep), seeded(8)), x)


def test_completion_cannot_look_ahead():
    """The first masked position's distribution depends only on what precedes it."""
    prior = tiny(vocab_size=4, grid=(2, 3), temperature=1.0)
    n, j = 6000, 2
    x = torch.tensor([[1, 3, 0, 2, 1, 0]]).repeat(n, 1)
    keep = torch.ones(n, 6, dtype=torch.bool)
    keep[:, j] = False
    other = x.clone()
    other[:, j + 1:] = torch.tensor([3, 3, 2])  # different kept tokens after j
    a = prior.complete(x, keep, seeded(9))
    b = prior.complete(other, keep, seeded(9))
    assert torch.equal(a[:, j], b[:, j])  # same seed, same prefix -> same draw whatever follows
    with torch.no_grad():
        p = prior.logits(x[:1])[0, j].double().softmax(-1)  # the model's p(x_j | x_<j)
    freq = torch.bincount(a[:, j], minlength=4).double() / n
    assert (freq - p).abs().max() < 4 * (0.25 / n) ** 0.5
    # A bidirectional model would see the suffix; ours must give the same distribution for both.
    freq_b = torch.bincount(b[:, j], minlength=4).double() / n
    assert torch.equal(freq, freq_b)


def test_upper_half_completion_keeps_the_lower_half():
    prior = tiny(vocab_size=5, grid=(4, 4))
    x = torch.randint(0, 5, (6, 16), generator=seeded(10))
    keep = torch.zeros(6, 4, 4, dtype=torch.bool)
    keep[:, 2:] = True  # lower half of the token grid
    keep = keep.flatten(1)
    calls = count_network_calls(prior)
    out = prior.complete(x, keep, seeded(11))
    assert torch.equal(out[:, 8:], x[:, 8:])
    assert len(calls) == 8 == prior.completion_nfe(keep) == prior.completion_nfe(keep[0])  # positions 0..7
    assert torch.equal(out, prior.complete(x, keep, seeded(11), use_cache=False))
    keep[0, 3] = False
    keep[:, 0] = True  # rows generate positions 1..7 between them
    assert prior.completion_nfe(keep) == 7 and prior.completion_nfe(torch.ones_like(keep)) == 0


def test_from_budget_and_arch_config_rebuild():
    prior = ARPrior.from_budget(64, (4, 4), budget=150_000, T=5, n_layer=2, n_head=4,
                                sample={"temperature": 0.9, "top_k": 10, "top_p": None})
    assert abs(prior.num_params() - 150_000) <= 15_000
    assert (prior.temperature, prior.top_k, prior.top_p) == (0.9, 10, None)
    # sampling settings only come under `sample:`, as in conf/prior/ar.yaml
    with pytest.raises(ValueError, match=r"^prior\.temperature is not an option of prior=ar \(options: n_layer, "
                                         r"n_head, dropout, sample\)$"):
        ARPrior.from_budget(64, (4, 4), budget=150_000, T=2, n_layer=2, n_head=4, temperature=0.9)
    rebuilt = ARPrior(**prior.arch_config())
    rebuilt.load_state_dict(prior.state_dict())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        # The same weights, the same shapes, the same kernel: bit-identical.
        assert torch.equal(rebuilt.logits(x), prior.logits(x))
    with pytest.raises(ValueError, match="too small"):
        ARPrior.from_budget(64, (4, 4), budget=1000, T=2)
    with pytest.raises(ValueError, match="prior.beta"):
        ARPrior.from_budget(64, (4, 4), budget=150_000, T=2, beta=3)
    with pytest.raises(ValueError, match="temperature"):
        ARPrior.from_budget(64, (4, 4), budget=150_000, T=2, sample={"temperature": 0.0})


def test_registry_and_build_prior():
    assert list(PRIORS) == ["ar", "absorbing", "imagebart"]
    assert PRIORS["ar"] is ARPrior and priors.ARPrior is ARPrior
    cfg = {"name": "ar", "n_layer": 2, "n_head": 2, "dropout": 0.0,
           "sample": {"temperature": 1.0, "top_k": None, "top_p": None}}
    prior = build_prior("ar", 32, (2, 4), T=3, budget=40_000, cfg=cfg)
    assert isinstance(prior, ARPrior) and abs(prior.num_params() - 40_000) <= 4_000
    with pytest.raises(ValueError, match=r"^prior=gan is not one of: ar, absorbing, imagebart$"):
        build_prior("gan", 32, (2, 4), T=3, budget=40_000, cfg={})


def test_yaml_config_builds_the_prior():
    from omegaconf import OmegaConf
    cfg = OmegaConf.load("conf/prior/ar.yaml")
    assert cfg.name == "ar"
    prior = build_prior(cfg.name, 32, (4, 4), T=2, budget=300_000, cfg=cfg)
    assert prior.top_k is None and prior.temperature == 1.0 and prior.arch.n_layer == cfg.n_layer
