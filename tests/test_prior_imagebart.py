"""ImageBART prior: forward-process math against brute force, the ELBO against the exact
marginal likelihood of a tiny chain (enumerated), sampling/completion behaviour, budgets."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from priors.base import NLL
from priors.imagebart import (ImageBARTPrior, betas_to_alpha_bars, linear_alpha_bars, make_betas,
                              q_marginal_probs, q_onestep_probs, q_posterior_probs, q_sample_marginal,
                              q_sample_onestep)
from tests import tolerance
from tests.priortools import all_sequences, count_network_calls

F64 = torch.float64
# Forward-process probabilities in float64: products of at most T = 9 one-step V x V matrices (V <= 5) and one
# normalisation, all terms nonnegative, so at most T V + 2 roundings relative: gamma_47 = 5e-15, SAFETY for the
# pow and division of the schedule arithmetic.
CHAIN = tolerance.SAFETY * tolerance.gamma(9 * 5 + 2)


pytestmark = pytest.mark.usefixtures("one_thread")


def onestep_matrix(beta: float, V: int) -> torch.Tensor:
    """M[j, k] = q(x_t = k | x_{t-1} = j), built row by row from Eq. 5."""
    return q_onestep_probs(torch.arange(V), beta, V, F64)  # (V, V)


def tiny(V: int, grid: tuple[int, int], T: int, seed: int = 0, **kw) -> ImageBARTPrior:
    """A tiny prior with large random weights: the default init (std 0.02) gives nearly uniform
    conditionals, which would make every likelihood comparison below trivially pass."""
    torch.manual_seed(seed)
    kw = {"n_layer": 2, "n_head": 2, "d_model": 16, **kw}
    prior = ImageBARTPrior(V, grid, T, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return prior.double().eval()  # float64 so that enumerated sums are exact to ~1e-12


# ---------------------------------------------------------------------------------------------
# forward process
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", {"betas": [0.3, 0.5, 0.2, 1.0]}])
def test_marginal_is_product_of_onestep_matrices(schedule):
    V, T = 4, 5
    betas = make_betas(schedule, T)
    alpha_bars = betas_to_alpha_bars(betas)
    prod = torch.eye(V, dtype=F64)
    for t in range(2, T + 1):
        prod = prod @ onestep_matrix(betas[t], V)  # q(x_t | x_1) as a V x V matrix
        marginal = q_marginal_probs(torch.arange(V), alpha_bars[t], V, F64)  # Eq. 6
        torch.testing.assert_close(marginal, prod, rtol=0, atol=CHAIN)
    torch.testing.assert_close(prod, torch.full((V, V), 1.0 / V, dtype=F64), rtol=0, atol=CHAIN)  # x_T uniform


@pytest.mark.parametrize("V", [3, 4])
def test_posterior_matches_bayes_by_enumeration(V):
    T = 5
    betas = make_betas({"betas": [0.25, 0.4, 0.6, 1.0]}, T)
    alpha_bars = betas_to_alpha_bars(betas)
    for t in range(3, T + 1):
        # joint q(x_{t-1}, x_t | x_1) from one-step matrices only (no use of Eq. 6)
        to_prev = torch.eye(V, dtype=F64)
        for s in range(2, t):
            to_prev = to_prev @ onestep_matrix(betas[s], V)  # [x_1, x_{t-1}]
        step = onestep_matrix(betas[t], V)  # [x_{t-1}, x_t]
        for x1, xt in itertools.product(range(V), repeat=2):
            joint = torch.tensor([to_prev[x1, k] * step[k, xt] for k in range(V)], dtype=F64)
            expected = joint / joint.sum()
            got = q_posterior_probs(torch.tensor(xt), torch.tensor(x1), betas[t], alpha_bars[t - 1], V, F64)
            torch.testing.assert_close(got, expected, rtol=0, atol=CHAIN)
            # its normaliser is q(x_t | x_1) of Eq. 6
            assert math.isclose(joint.sum().item(),
                                q_marginal_probs(torch.tensor(x1), alpha_bars[t], V, F64)[xt].item(), abs_tol=CHAIN)
    # beta_T = 1: x_T says nothing, the posterior of the last scale is q(x_{T-1} | x_1)
    x1, xt = torch.arange(V).repeat(V), torch.arange(V).repeat_interleave(V)
    torch.testing.assert_close(q_posterior_probs(xt, x1, 1.0, 0.3, V, F64), q_marginal_probs(x1, 0.3, V, F64))


def test_forward_samplers_match_their_distributions():
    V, n = 4, 40000
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1), 2, dtype=torch.long)
    # Frequencies of n = 40000 draws: sd <= sqrt(0.25 / n) = 0.0025 each, so 0.012 is 4.8 sd.
    for alpha_bar in (0.0, 0.35, 1.0):
        freq = torch.bincount(q_sample_marginal(x, alpha_bar, V, g).flatten(), minlength=V).double() / n
        torch.testing.assert_close(freq, q_marginal_probs(torch.tensor(2), alpha_bar, V, F64), rtol=0, atol=0.012)
    freq = torch.bincount(q_sample_onestep(x, 0.6, V, g).flatten(), minlength=V).double() / n
    torch.testing.assert_close(freq, q_onestep_probs(torch.tensor(2), 0.6, V, F64), rtol=0, atol=0.012)


def test_training_pairs_follow_the_forward_chain():
    """(x_{t-1}, x_t) for the Eq. 7 loss are drawn jointly, so the teacher-forced x_{t-1} follows the
    posterior given x_t (an x_{t-1} drawn independently of x_t would bias the KL estimate)."""
    V, n, t = 3, 60000, 3
    prior = ImageBARTPrior(V, (1, 1), 4, n_layer=2, n_head=2, d_model=16, schedule={"betas": [0.4, 0.5, 1.0]})
    x1 = torch.full((n, 1), 1, dtype=torch.long)
    x_prev, x_t = prior._forward_pair(t, x1, torch.Generator().manual_seed(0))
    freq = torch.bincount((x_prev * V + x_t).flatten(), minlength=V * V).double().view(V, V) / n
    joint = q_marginal_probs(torch.tensor(1), prior.alpha_bars[t - 1], V, F64)[:, None] * \
        onestep_matrix(prior.betas[t], V)  # [x_{t-1}, x_t]
    # n = 60000 draws over 9 cells: sd <= sqrt(0.25 / n) = 0.002 each, so 0.01 is 5 sd.
    torch.testing.assert_close(freq, joint, rtol=0, atol=0.01)


# ---------------------------------------------------------------------------------------------
# schedules and options
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [2, 3, 5, 9])
def test_linear_schedule(T):
    betas = make_betas("linear", T)
    ab = betas_to_alpha_bars(betas)
    assert len(betas) == T + 1 and betas[T] == 1.0 and ab[T] == 0.0
    # Scalar float64 arithmetic of at most T = 9 products and divisions: within CHAIN of the closed forms.
    for t in range(1, T + 1):
        assert math.isclose(ab[t], (T - t) / (T - 1), abs_tol=CHAIN)  # linear from 1 at t=1 to 0 at t=T
        assert math.isclose(ab[t], linear_alpha_bars(T)[t], abs_tol=CHAIN)
    for t in range(2, T + 1):
        assert math.isclose(betas[t], 1.0 / (T - t + 1), rel_tol=CHAIN)  # the official "geometric" redraw probs


def test_explicit_schedules_round_trip():
    tab5 = [0.152, 0.231, 1.0]  # LSUN, ImageBART Tab. 5, T = 4
    betas = make_betas({"betas": tab5}, 4)
    assert betas[2:] == tab5
    ab = betas_to_alpha_bars(betas)
    assert math.isclose(ab[3] * 256, 166.5, abs_tol=0.5)  # Tab. 5 "effective seq. length" 166
    again = make_betas({"alpha_bars": ab[2:]}, 4)
    assert all(math.isclose(a, b, abs_tol=CHAIN) for a, b in zip(again, betas))
    ab_given = [0.75, 0.5, 0.5, 0.0]  # equal consecutive alpha_bars (beta = 0) are allowed
    assert all(math.isclose(a, b, abs_tol=CHAIN)
               for a, b in zip(betas_to_alpha_bars(make_betas({"alpha_bars": ab_given}, 5))[2:], ab_given))


@pytest.mark.parametrize("schedule", [
    {"betas": [0.5, 1.0]},  # wrong length for T = 4
    {"betas": [0.5, 0.5, 0.9]},  # last beta != 1
    {"betas": [0.0, 0.5, 1.0]},  # beta out of (0, 1]
    {"betas": [0.5, 1.5, 1.0]},
    {"alpha_bars": [0.5, 0.6, 0.0]},  # increasing
    {"alpha_bars": [0.9, 0.5, 0.1]},  # last != 0
    {"alpha_bars": [0.5, 0.0]},  # wrong length
    {"alpha_bars": [0.5, 0.0, 0.0]},  # zero before the last
    "cosine", {"gammas": [0.1, 0.2, 1.0]}, {"betas": "abc"},
])
def test_bad_schedules_raise(schedule):
    with pytest.raises(ValueError, match=r"prior\.schedule"):
        make_betas(schedule, 4)
    with pytest.raises(ValueError, match=r"prior\.schedule"):
        ImageBARTPrior.from_budget(8, (2, 2), 100_000, 4, n_layer=2, n_head=2, schedule=schedule)


@pytest.mark.parametrize("T", [1, 0, -3, 2.5, 3.0, "3", True])
def test_bad_T_raises(T):
    with pytest.raises(ValueError, match=r"T="):
        ImageBARTPrior(8, (2, 2), T)
    with pytest.raises(ValueError, match=r"T="):
        ImageBARTPrior.from_budget(8, (2, 2), 100_000, T)


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"prior\.sample\.nope"):
        ImageBARTPrior(8, (2, 2), 3, sample={"nope": 1})
    with pytest.raises(ValueError, match=r"prior\.sample\.temperature"):
        ImageBARTPrior(8, (2, 2), 3, sample={"temperature": 0})
    with pytest.raises(ValueError, match=r"prior\.sample\.completion_passes"):
        ImageBARTPrior(8, (2, 2), 3, sample={"completion_passes": -1})
    with pytest.raises(ValueError, match=r"prior\.foo"):
        ImageBARTPrior.from_budget(8, (2, 2), 100_000, 3, foo=1)
    with pytest.raises(ValueError, match=r"prior\.n_enc_layer"):
        ImageBARTPrior.from_budget(8, (2, 2), 100_000, 3, n_layer=4, n_enc_layer=4)


# ---------------------------------------------------------------------------------------------
# likelihood
# ---------------------------------------------------------------------------------------------

def transition_matrices(prior: ImageBARTPrior, seqs: torch.Tensor) -> dict[int, torch.Tensor]:
    """P_t[a, b] = p(x_{t-1} = seqs[b] | x_t = seqs[a]) for every pair of sequences."""
    S = seqs.shape[0]
    x_t, x_prev = seqs.repeat_interleave(S, 0), seqs.repeat(S, 1)  # all (a, b) pairs
    with torch.no_grad():
        return {t: prior.seq_log_prob(t, x_prev, x_t).double().view(S, S).exp()
                for t in range(2, prior.T + 1)}


def scale_logits(prior: ImageBARTPrior, seqs: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every scale's logits for every (x_{t-1}, x_t) pair of sequences: what transition_matrices normalises."""
    S = seqs.shape[0]
    x_t, x_prev = seqs.repeat_interleave(S, 0), seqs.repeat(S, 1)
    with torch.no_grad():
        return {t: prior.units()[f"scale{t}"](x_prev, x_t if prior.units()[f"scale{t}"].encoder is not None else None)
                for t in range(2, prior.T + 1)}


def exact_nll_and_elbo(prior: ImageBARTPrior, x1: torch.Tensor) -> tuple[float, float]:
    """-log p(x_1) of the model's chain (sum over x_2..x_T, p(x_T) uniform) and the ELBO computed
    with every expectation enumerated, both in nats for one sequence x1 (L,)."""
    V, L, T = prior.vocab_size, prior.seq_len, prior.T
    seqs = all_sequences(V, L)
    S = seqs.shape[0]
    P = transition_matrices(prior, seqs)
    # A sequence's probability is a product of L float64 softmax entries of shared logits: relative error
    # L log_softmax_error each; sums over S sequences keep it (the terms are positive), T - 1 chained ones add.
    token = max(tolerance.log_softmax_error(logits) for logits in scale_logits(prior, seqs).values())
    tol = (T - 1) * L * token + tolerance.gamma(S * T)
    for t in P:  # every scale is a normalised distribution over whole sequences
        torch.testing.assert_close(P[t].sum(1), torch.ones(S, dtype=F64), rtol=0, atol=tol)
    dist = torch.full((S,), 1.0 / S, dtype=F64)
    for t in range(T, 1, -1):
        dist = dist @ P[t]  # p(x_{t-1})
    assert math.isclose(dist.sum().item(), 1.0, abs_tol=tol)
    i1 = int((seqs == x1).all(1).nonzero())
    nll = -math.log(dist[i1].item())

    def seq_probs(per_pos: torch.Tensor) -> torch.Tensor:  # (L, V) factorised -> (S,) over seqs
        return per_pos[torch.arange(L), seqs].prod(1)

    ab, betas = prior.alpha_bars, prior.betas
    q2 = seq_probs(q_marginal_probs(x1, ab[2], V, F64))
    elbo = (q2 * -P[2][:, i1].log()).sum().item()  # E_q[-log p(x_1 | x_2)]
    for t in range(3, T + 1):
        qt = seq_probs(q_marginal_probs(x1, ab[t], V, F64))  # q(x_t | x_1) over x_t = seqs[a]
        post = torch.stack([seq_probs(q_posterior_probs(seqs[a], x1, betas[t], ab[t - 1], V, F64))
                            for a in range(S)])  # [a, b] = q(x_{t-1} = seqs[b] | x_t = seqs[a], x_1)
        kl = (torch.xlogy(post, post) - post * P[t].log()).sum(1)  # (S,)
        elbo += (qt * kl).sum().item()
    return nll, elbo


@pytest.mark.parametrize("V,grid,T,seed", [(3, (1, 3), 3, 0), (2, (1, 3), 4, 1), (3, (1, 2), 5, 2)])
def test_elbo_bounds_exact_nll(V, grid, T, seed):
    prior = tiny(V, grid, T, seed=seed, schedule="linear" if T != 4 else {"betas": [0.3, 0.6, 1.0]})
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1]
    for x1 in torch.randint(0, V, (2, L), generator=g):
        nll, elbo = exact_nll_and_elbo(prior, x1)
        assert elbo >= nll - 1e-9  # the bound holds
        assert elbo - nll > 1e-3  # ... and is not trivially tight here, so the check has teeth
        # the Monte Carlo estimate of nll() is unbiased, per sequence, for the enumerated ELBO
        est = prior.nll(x1.repeat(2000, 1), generator=g, chunk=2000)
        assert est.kind == "elbo" and est.reason is None and not est.extra
        assert est.per_sequence.shape == (2000,) and est.per_sequence.dtype == F64
        se = est.per_sequence.std().item() / math.sqrt(2000)
        elbo_bits = elbo / (L * math.log(2))
        assert se > 0 and abs(est.per_sequence.mean().item() - elbo_bits) < 4 * se, (est, elbo_bits)
        one = prior.nll(x1[None], generator=g)  # a batch of one: one value
        assert one.kind == "elbo" and one.per_sequence.shape == (1,) and torch.isfinite(one.per_sequence).all()


def test_T2_nll_is_exact_ar_likelihood():
    V, grid = 3, (1, 3)
    prior = tiny(V, grid, 2, seed=3)
    model = prior.scales["scale2"]
    assert model.encoder is None and model.start_id == V  # decoder-only AR model of x_1
    seqs = all_sequences(V, 3)
    # brute force: p(x) as a product of next-token conditionals, feeding each prefix separately
    logp = torch.zeros(len(seqs), dtype=F64)
    with torch.no_grad():
        for i in range(3):
            ctx = torch.cat([torch.full((len(seqs), 1), V), seqs[:, :i]], 1)
            logits = model.decoder(ctx)[:, -1].double()
            logp += logits.log_softmax(-1).gather(1, seqs[:, i:i + 1]).squeeze(1)
    # float64 network: each token's log-probability within `token` nats of exact, for this forward and for the
    # prior's own (another batch shape: other roundings); a sequence's probability within 3 tokens' error.
    with torch.no_grad():
        logits = model.decoder(torch.cat([torch.full((len(seqs), 1), V), seqs[:, :2]], 1))
    token = tolerance.log_softmax_error(logits, tolerance.transformer_error(16, 2, 3, eps=tolerance.EPS64))
    assert math.isclose(logp.exp().sum().item(), 1.0, abs_tol=math.expm1(3 * token))
    est = prior.nll(seqs)
    assert est.kind == "exact" and est.per_sequence.shape == (len(seqs),)
    bits = -logp / (3 * math.log(2))
    torch.testing.assert_close(est.per_sequence, bits, rtol=0, atol=2 * token / math.log(2))  # row by row
    loss, _ = prior.unit_loss("scale2", seqs)  # Eq. 8 with x_2 independent: the AR cross-entropy
    assert math.isclose(loss.item(), (-logp / 3).mean().item(), rel_tol=0, abs_tol=2 * token)


def test_unit_losses_and_gradients_stay_in_their_unit():
    prior = tiny(5, (2, 3), 4).train()
    assert list(prior.units()) == ["scale2", "scale3", "scale4"]
    assert prior.units()["scale4"].encoder is None and prior.units()["scale3"].encoder is not None
    x = torch.randint(0, 5, (8, 6))
    for unit, module in prior.units().items():
        prior.zero_grad(set_to_none=True)
        loss, logs = prior.unit_loss(unit, x, torch.Generator().manual_seed(0))
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() >= 0  # CE and KL are non-negative
        assert logs["loss"] == loss.item()  # the same float, logged
        loss.backward()
        for name, other in prior.units().items():
            has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())
            assert has_grad == (name == unit)


@pytest.mark.parametrize("residual", [True, False])
def test_likelihood_residual_sets_the_untrained_conditional(residual):
    """With the decoder head zeroed, scale t < T predicts exactly q(x_t | x_{t-1} = k) / Z over k (the
    residual alone; Eq. 5 is symmetric so Z = 1), and uniform without the residual; the last scale
    is uniform either way. The same holds for the conditionals the sampler draws from."""
    V, T = 5, 4
    prior = ImageBARTPrior(V, (2, 3), T, n_layer=2, n_head=2, d_model=16, likelihood_residual=residual).double()
    assert prior.arch_config()["likelihood_residual"] is residual
    with torch.no_grad():
        for m in prior.units().values():
            m.decoder.head.weight.zero_()
    g = torch.Generator().manual_seed(0)
    x_t, x_prev = torch.randint(0, V, (3, 6), generator=g), torch.randint(0, V, (3, 6), generator=g)
    for t in range(2, T + 1):
        model = prior.units()[f"scale{t}"]
        assert (model.log_scale is not None) == (residual and t < T)
        p = model(x_prev, x_t).softmax(-1)  # (3, 6, V)
        want = q_onestep_probs(x_t, prior.betas[t], V, F64) if residual and t < T \
            else torch.full((3, 6, V), 1.0 / V, dtype=F64)
        # float64 softmax of the residual log q(x_t | x_{t-1}) alone (the head is zero): a few roundings of
        # probabilities <= 1 over V = 5 classes, gamma_{V + 2} each, SAFETY for exp and log.
        torch.testing.assert_close(p, want, rtol=0, atol=tolerance.SAFETY * tolerance.gamma(V + 2))
    # Sampling scale 3 (beta_3 = 1/2 for T = 4) from a constant x_3 copies it with probability 1/2 + 1/10.
    x3 = torch.full((400, 6), 2)
    same = (prior.eval().sample_scale(3, x3, torch.Generator().manual_seed(1)) == 2).double().mean().item()
    assert abs(same - ((1 - prior.betas[3]) + prior.betas[3] / V if residual else 1.0 / V)) < 0.04


def test_likelihood_residual_option_is_checked_and_costs_one_parameter_per_scale():
    with pytest.raises(ValueError, match=r"prior\.likelihood_residual"):
        ImageBARTPrior.from_budget(8, (2, 2), 100_000, 3, likelihood_residual="yes")
    on = ImageBARTPrior(8, (2, 2), 4, d_model=16, n_head=2, n_layer=2)
    off = ImageBARTPrior(8, (2, 2), 4, d_model=16, n_head=2, n_layer=2, likelihood_residual=False)
    assert on.num_params() - off.num_params() == 2  # one log-scale for each of the T - 2 = 2 enc-dec scales


def test_training_lowers_the_elbo():
    torch.manual_seed(0)
    V, T = 4, 3
    prior = ImageBARTPrior(V, (2, 2), T, n_layer=2, n_head=2, d_model=16)
    data = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 0]]).repeat(4, 1)
    g = torch.Generator().manual_seed(0)
    before = prior.nll(data.repeat(8, 1), generator=g).per_sequence.mean().item()
    opts = {u: torch.optim.Adam(m.parameters(), lr=1e-2) for u, m in prior.units().items()}
    for _ in range(60):
        for unit, opt in opts.items():
            opt.zero_grad()
            prior.unit_loss(unit, data, g)[0].backward()
            opt.step()
    after = prior.nll(data.repeat(8, 1), generator=g).per_sequence.mean().item()
    assert after < 0.5 * before  # about 0.25 bits/token is reachable: two patterns
    assert after > -1e-6


# ---------------------------------------------------------------------------------------------
# sampling and completion
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", [{}, {"temperature": 0.7, "top_k": 3}])
def test_kv_cache_sampling_equals_uncached(sample):
    prior = tiny(6, (2, 4), 3, seed=4, sample=sample)
    a = prior.sample(5, torch.Generator().manual_seed(7))
    prior.sample_cfg.use_cache = False
    b = prior.sample(5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # the masked decoder (forced prefix fed in one call, early stop) agrees as well
    x = torch.randint(0, 6, (5, 8))
    keep = torch.zeros(5, 8, dtype=torch.bool)
    keep[:, :3] = True
    keep[:, 6:] = True
    keep[0, 1] = False
    outs = []
    for use_cache in (True, False):
        outs.append(prior.sample_scale(2, x, torch.Generator().manual_seed(1), keep_mask=keep, forced=x,
                                       use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("T", [2, 3, 5])
def test_samples_shape_range_seed(T):
    prior = tiny(7, (2, 3), T, seed=5)
    s = prior.sample(4, torch.Generator().manual_seed(0))
    assert s.shape == (4, 6) and s.dtype == torch.long
    assert int(s.min()) >= 0 and int(s.max()) < 7
    assert torch.equal(s, prior.sample(4, torch.Generator().manual_seed(0)))
    assert not torch.equal(s, prior.sample(4, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("T", [2, 3, 4])
def test_nfe_counts_network_calls(T):
    prior = tiny(5, (2, 3), T)
    calls = count_network_calls(prior)
    prior.sample(3, torch.Generator().manual_seed(0))
    assert len(calls) == prior.nfe() == (T - 1) * 6 + (T - 2)


@pytest.mark.parametrize("T,passes", [(2, 2), (3, 0), (3, 2), (4, 3)])
def test_completion_keeps_kept_positions(T, passes):
    V = 6
    prior = tiny(V, (4, 4), T, seed=6, sample={"completion_passes": passes})
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (6, 16), generator=g)
    upper = torch.zeros(4, 4, dtype=torch.bool)
    upper[2:] = True  # keep the lower half, generate the upper half (ImageBART Fig. 5)
    keep = torch.cat([upper.flatten()[None].expand(3, -1), torch.rand(3, 16, generator=g) < 0.5])
    out = prior.complete(x, keep, g)
    assert out.shape == x.shape and out.dtype == torch.long
    assert torch.equal(out[keep], x[keep])
    assert int(out.min()) >= 0 and int(out.max()) < V
    assert (out[~keep] != x[~keep]).any()  # masked positions are regenerated
    assert torch.equal(prior.complete(x, torch.ones_like(keep), g), x)


@pytest.mark.parametrize("T", [2, 3, 5])
def test_completion_is_one_masked_reverse_pass_by_default(T):
    """Tab. 3 protocol (A.3): the default completion is one masked pass through the reverse chain; each
    extra pass at t = 2 (Eq. 12) adds the calls of one masked pass through scale 2."""
    L, V = 16, 6
    upper = torch.arange(L) < L // 2  # generate the upper half, keep the lower half
    keep = (~upper).expand(4, L).clone()
    x = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    prior = tiny(V, (4, 4), T, seed=7)
    assert prior.sample_cfg.completion_passes == 0
    calls = count_network_calls(prior)
    prior.complete(x, keep, torch.Generator().manual_seed(1))
    one_pass = (T - 1) * (L // 2) + (T - 2)  # L/2 decoder calls per scale + one encoder call per enc-dec scale
    assert len(calls) == one_pass == prior.completion_nfe(keep) == prior.completion_nfe(keep[0])
    prior.sample_cfg.completion_passes = 2
    calls.clear()
    prior.complete(x, keep, torch.Generator().manual_seed(1))
    extra = 0 if T == 2 else 2 * (L // 2 + 1)  # scale 2's decoder over the upper half + its encoder, per pass
    assert len(calls) == one_pass + extra == prior.completion_nfe(keep)
    # a random mask: the batch decodes from the first to the last position any row generates
    keep = torch.rand(4, L, generator=torch.Generator().manual_seed(2)) < 0.5
    keep[:, :2] = True
    calls.clear()
    prior.complete(x, keep, torch.Generator().manual_seed(1))
    assert len(calls) == prior.completion_nfe(keep)
    calls.clear()  # nothing to generate: no network call
    assert torch.equal(prior.complete(x, torch.ones_like(keep)), x) and not calls
    assert prior.completion_nfe(torch.ones_like(keep)) == 0


def test_yaml_default_completes_in_one_masked_pass():
    from omegaconf import OmegaConf
    from pathlib import Path
    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/prior/imagebart.yaml"))
    assert cfg["sample"]["completion_passes"] == 0


def test_completion_is_seeded():
    prior = tiny(6, (2, 4), 3, seed=8)
    x = torch.randint(0, 6, (4, 8))
    keep = torch.rand(4, 8) < 0.5
    a = prior.complete(x, keep, torch.Generator().manual_seed(3))
    assert torch.equal(a, prior.complete(x, keep, torch.Generator().manual_seed(3)))


# ---------------------------------------------------------------------------------------------
# budget and rebuilding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [200_000, 1_000_000, 5_000_000])
@pytest.mark.parametrize("T", [2, 3, 5, 9])
def test_budget_is_met_and_split_equally(budget, T):
    prior = ImageBARTPrior.from_budget(64, (4, 4), budget, T, n_layer=4, n_head=4)
    assert abs(prior.num_params() - budget) <= 0.1 * budget
    per_scale = [sum(p.numel() for p in m.parameters()) for m in prior.units().values()]
    assert len(per_scale) == T - 1
    # equal shares up to the step of one width (n_head) at the smallest sizes, see from_budget
    assert all(abs(n - budget / (T - 1)) <= 0.25 * budget / (T - 1) for n in per_scale)
    if budget >= 1_000_000:
        assert all(abs(n - budget / (T - 1)) <= 0.1 * budget / (T - 1) for n in per_scale)


def test_budget_balances_widths_when_one_width_cannot_fit():
    # d_model moves in steps of n_head: at 50k parameters per scale no single width is within 10%,
    # so the widths alternate and the total still meets the budget
    prior = ImageBARTPrior.from_budget(256, (8, 8), 400_000, 9, n_layer=4, n_head=4)
    assert abs(prior.num_params() - 400_000) <= 40_000
    assert len(set(prior.arch_config()["d_model"])) > 1


@pytest.mark.parametrize("T", [2, 5, 9])
def test_too_small_budget_raises(T):
    with pytest.raises(ValueError, match=rf"budget\.params=3000 is too small for imagebart T={T}"):
        ImageBARTPrior.from_budget(64, (4, 4), 3000, T, n_layer=4, n_head=4)


def test_arch_config_rebuilds_the_same_prior():
    prior = ImageBARTPrior.from_budget(32, (2, 4), 300_000, 4, n_layer=3, n_head=2, enc_frac=0.34,
                                       schedule={"betas": [0.2, 0.5, 1.0]},
                                       sample={"temperature": 0.9, "completion_passes": 1})
    cfg = prior.arch_config()
    assert "sample" not in cfg  # sampling settings are not architecture
    rebuilt = ImageBARTPrior(**cfg)
    assert rebuilt.betas == prior.betas
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in prior.state_dict().items()}
    rebuilt.load_state_dict(prior.state_dict())
    x = torch.randint(0, 32, (3, 8))
    assert torch.equal(rebuilt.nll(x, torch.Generator().manual_seed(0)).per_sequence,
                       prior.nll(x, torch.Generator().manual_seed(0)).per_sequence)
    enc_dec = [(m.cfg.n_enc_layer, m.cfg.n_dec_layer) for m in prior.units().values()]
    assert enc_dec == [(1, 2), (1, 2), (0, 3)]
    assert isinstance(prior.nll(x), NLL)
