"""The shared transformer: causality, KV cache == full recompute, budget fitting, logit filters."""
import itertools

import pytest
import torch

from priors import cpu_decode
from priors.transformer import (Transformer, TransformerConfig, count_params, exponential_draws, filter_logits,
                                fit_d_model, sample_logits)
from tests import tolerance as T


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(causal=True, cross_attn=False, vocab_out=11, seq_len=12, n_layer=2, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_in=13, vocab_out=vocab_out, seq_len=seq_len, n_layer=n_layer, n_head=2,
                            d_model=16, causal=causal, cross_attn=cross_attn)
    model = Transformer(cfg).eval()
    # Larger weights than the 0.02 init so that every position's output visibly depends on its inputs.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def rounding(model: Transformer, out: torch.Tensor, memory_len: int = 0) -> float:
    """Absolute float32 rounding bound of the logits `out` of one forward route (tests/tolerance.py): two routes
    (cached and full, fused and written-out attention, any kernel) agree within twice it."""
    cfg = model.cfg
    return T.transformer_error(cfg.d_model, cfg.n_layer, cfg.seq_len, memory_len) * float(out.abs().max())


@pytest.mark.parametrize("j", [0, 3, 11])
def test_causal_outputs_depend_only_on_the_past(j):
    model = tiny(causal=True)
    idx = torch.randint(0, 13, (3, 12), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, j] = (changed[:, j] + 1) % 13
    with torch.no_grad():
        a, b = model(idx), model(changed)  # (B, L, V)
    assert torch.equal(a[:, :j], b[:, :j])  # bit-identical: the change cannot reach earlier rows
    diff = (a - b).abs().amax(dim=(0, 2))  # (L,)
    noise = 2 * rounding(model, a)  # what rounding alone could move (5e-4 here; the moves are 0.03-0.36)
    assert diff[j] > noise  # the changed position's own output moves
    assert (diff[j:] > noise).all()  # ... and every later one sees it


def test_bidirectional_outputs_see_the_future():
    model = tiny(causal=False)
    idx = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 13
    with torch.no_grad():
        out = model(idx)
        diff = (out - model(changed)).abs().amax(dim=(0, 2))  # (L,)
    assert (diff > 2 * rounding(model, out)).all()


def cached_forward(model, idx, chunks, memory=None, memory_every_call=False):
    """Feed idx through a KV cache in chunks of the given lengths; concatenate the outputs."""
    cache, outs, pos = model.new_cache(), [], 0
    for i, n in enumerate(chunks):
        mem = memory if (i == 0 or memory_every_call) else None
        outs.append(model(idx[:, pos:pos + n], memory=mem, cache=cache))
        pos += n
    assert cache.length == pos == idx.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 12, [3, 1, 4, 1, 3], [12]])
def test_kv_cache_equals_full_forward_self_attention(chunks):
    model = tiny(causal=True)
    idx = torch.randint(0, 13, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cached = cached_forward(model, idx, chunks)
    torch.testing.assert_close(cached, full, rtol=0, atol=2 * rounding(model, full))


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 6]])
@pytest.mark.parametrize("memory_every_call", [False, True])
def test_kv_cache_equals_full_forward_cross_attention(chunks, memory_every_call):
    model = tiny(causal=True, cross_attn=True)
    idx = torch.randint(0, 13, (4, 12), generator=torch.Generator().manual_seed(4))
    memory = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(5))  # (B, M, D)
    with torch.no_grad():
        full = model(idx, memory=memory)
        cached = cached_forward(model, idx, chunks, memory, memory_every_call)
        other = model(idx, memory=torch.randn_like(memory))
    noise = 2 * rounding(model, full, memory_len=7)
    torch.testing.assert_close(cached, full, rtol=0, atol=noise)
    assert (other - full).abs().amax() > noise  # the memory is actually attended to


@pytest.mark.parametrize("cross_attn", [False, True])
def test_decode_steps_equal_the_full_forward(cross_attn):
    """Transformer.decode after a one-token prefill, in its int form (eager: the written prefix) and its tensor
    form (static shapes: the whole buffer, masked), equals the full forward and the cached forward calls to
    float rounding (its attention is written out, the forward calls use the fused kernel)."""
    model = tiny(causal=True, cross_attn=cross_attn)
    idx = torch.randint(0, 13, (4, 12), generator=torch.Generator().manual_seed(9))
    memory = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(10)) if cross_attn else None
    with torch.no_grad():
        full = model(idx, memory=memory)  # (B, L, V)
        chunked = cached_forward(model, idx, [1] * 12, memory)
        outs = {}
        for form in ("int", "tensor"):
            cache = model.new_cache()
            steps = [model(idx[:, :1], memory=memory, cache=cache)]  # prefill: allocates, projects the memory
            positions = cache.layers[0].positions
            for i in range(1, 12):
                pos = i if form == "int" else positions[i:i + 1]
                steps.append(model.decode(idx[:, i:i + 1], cache, pos))
            outs[form] = torch.cat(steps, dim=1)  # (B, L, V)
    noise = 2 * rounding(model, full, memory_len=7 if cross_attn else 0)
    torch.testing.assert_close(outs["int"], chunked, rtol=0, atol=noise)
    torch.testing.assert_close(outs["int"], full, rtol=0, atol=noise)
    torch.testing.assert_close(outs["tensor"], full, rtol=0, atol=noise)


def test_decode_needs_a_filled_cache_and_eval_mode():
    model = tiny(causal=True)
    with pytest.raises(ValueError, match="KVCache is empty"):
        model.decode(torch.zeros(2, 1, dtype=torch.long), model.new_cache(), 0)
    cache = model.new_cache()
    model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.decode(torch.zeros(2, 1, dtype=torch.long), cache, 1)


def test_state_dict_keys_are_those_of_existing_checkpoints():
    """The decode path reuses the fused qkv projection: parameter names stay those of saved checkpoints."""
    model = tiny(causal=True, cross_attn=True, n_layer=1)
    block = ["ln_attn.weight", "ln_attn.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "ln_cross.weight", "ln_cross.bias", "cross.q.weight", "cross.q.bias",
             "cross.kv.weight", "cross.kv.bias", "cross.proj.weight", "cross.proj.bias", "ln_mlp.weight",
             "ln_mlp.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias"]
    assert list(model.state_dict()) == (["tok_emb.weight", "pos_emb.weight"] + [f"blocks.0.{k}" for k in block]
                                        + ["ln_f.weight", "ln_f.bias", "head.weight"])


def test_cross_attention_needs_memory():
    model = tiny(causal=True, cross_attn=True)
    with pytest.raises(ValueError, match="memory"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_encoder_returns_hidden_states_and_cache_respects_seq_len():
    enc = tiny(causal=False, vocab_out=0)
    idx = torch.randint(0, 13, (2, 12))
    assert enc(idx).shape == (2, 12, 16)  # (B, L, D)
    model = tiny(causal=True)
    cache = model.new_cache()
    model(idx, cache=cache)
    with pytest.raises(ValueError, match="seq_len"):
        model(idx[:, :1], cache=cache)


def test_bf16_autocast_runs_and_stays_close():
    model = tiny(causal=True, cross_attn=True)
    idx = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(6))
    memory = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = model(idx, memory=memory)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(idx, memory=memory)
            cached = cached_forward(model, idx, [4, 1, 7], memory)
    assert full.dtype == torch.bfloat16 and cached.dtype == torch.bfloat16
    # Autocast rounds each matmul's inputs to bfloat16 (eps 2^-7) and accumulates in float32: two roundings per
    # matmul, 9 matmuls per block with cross-attention, 2 blocks and the head: 38 roundings, independent
    # (gamma_random: 0.21 of the largest logit; measured 0.006). A path that computes something else is O(1) off.
    tol = T.gamma_random(38, float(torch.finfo(torch.bfloat16).eps)) * float(ref.abs().amax())
    assert (full.float() - ref).abs().amax() < tol
    assert (cached.float() - ref).abs().amax() < tol


def test_count_params_matches_a_real_model():
    for cross_attn, vocab_out in [(False, 11), (True, 0)]:
        model = tiny(cross_attn=cross_attn, vocab_out=vocab_out)
        assert count_params(model.cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("budget", [200_000, 1_000_000, 5_000_000, 85_000_000])
def test_fit_d_model_is_within_ten_percent_and_closest(budget):
    n_head = 4

    def count(d):
        return count_params(TransformerConfig(vocab_in=1025, vocab_out=1024, seq_len=256, n_layer=4,
                                              n_head=n_head, d_model=d, causal=True))

    d = fit_d_model(budget, count, n_head)
    assert d % n_head == 0
    assert abs(count(d) - budget) <= 0.1 * budget
    # Closest among the neighbouring widths (count is monotone, so these are the only rivals).
    for other in (d - n_head, d + n_head):
        if other >= n_head:
            assert abs(count(d) - budget) <= abs(count(other) - budget)


def test_fit_d_model_raises_for_a_tiny_budget():
    def count(d):
        return count_params(TransformerConfig(vocab_in=1025, vocab_out=1024, seq_len=256, n_layer=4,
                                              n_head=4, d_model=d, causal=True))

    with pytest.raises(ValueError, match=r"budget.params=5000 is too small for"):
        fit_d_model(5000, count, 4)
    # check=False: the closest width to any target, here the smallest; the one search ImageBART balances with
    assert fit_d_model(5000, count, 4, check=False) == fit_d_model(-1.0, count, 4, check=False) == 16
    for target in (123_456.5, 2_000_000):
        d = fit_d_model(target, count, 4, check=False)
        assert all(abs(count(d) - target) <= abs(count(other) - target) for other in range(16, 4 * d, 4))


def test_count_params_counts_any_module_built_from_its_config():
    from priors.imagebart import ScaleConfig, ScaleModel

    cfg = ScaleConfig(vocab_size=7, seq_len=6, n_enc_layer=1, n_dec_layer=1, n_head=2, d_model=8, residual_beta=0.5)
    assert count_params(cfg, ScaleModel) == sum(p.numel() for p in ScaleModel(cfg).parameters())


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.3]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Brute force: the kept set has mass >= p and no smaller set of tokens reaches p."""
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        logits = torch.randn(6, generator=g, dtype=torch.float64) * 2
        probs = logits.softmax(-1)
        for p in (0.05, 0.3, 0.5, 0.75, 0.9, 0.99):
            kept = torch.isfinite(filter_logits(logits[None], top_p=p))[0]
            assert probs[kept].sum() >= p
            min_size = min(len(s) for r in range(1, 7) for s in itertools.combinations(range(6), r)
                           if probs[list(s)].sum() >= p)
            assert int(kept.sum()) == min_size
            # ... and it is made of the most probable tokens.
            assert probs[kept].min() >= probs[~kept].max() if (~kept).any() else True


def test_top_p_known_case():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = lambda p: torch.isfinite(filter_logits(probs.log(), top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.45) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.9) == [True, True, False, True]
    assert kept(1.0) == [True, True, True, True]


def test_sample_logits_follows_temperature():
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(20000, 3)
    g = torch.Generator().manual_seed(8)
    for temperature in (0.5, 2.0):
        tokens = sample_logits(logits, temperature=temperature, generator=g)
        freq = torch.bincount(tokens, minlength=3).double() / 20000
        expected = (logits[0].double() / temperature).softmax(-1)
        assert (freq - expected).abs().max() < 4 * (0.25 / 20000) ** 0.5


def test_exponential_draws_are_exponential_s_own_bit_for_bit():
    """exponential_draws (uniform_ on float64, then a vectorized -log1p(-u), rounded to float32) against
    exponential_ itself: the same values and the same generator state after 4.2 million draws at the decode
    shapes. The two logarithms may differ in a double's last place; float32 rounding hides that except for about
    2^-29 of the draws (a value within one double ulp of a float32 rounding boundary), so at this count
    P(any mismatch) is below 1% for any pair of log1p implementations of one-ulp accuracy, and the seeds fix the
    draws. .ci/kernels runs this under the AVX2 and scalar kernels too. Other dtypes call exponential_ itself."""
    for shape in ((50, 130), (8, 1024)):
        g_ref, g = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        like = torch.empty(shape)
        for _ in range(300):
            ref = torch.empty_like(like).exponential_(1.0, generator=g_ref)
            got = exponential_draws(like, g)
            assert got.dtype == torch.float32 and got.shape == like.shape
            assert torch.equal(got, ref)
        assert torch.equal(g.get_state(), g_ref.get_state())
    like = torch.empty(50, 130, dtype=torch.float64)
    g_ref, g = torch.Generator().manual_seed(12), torch.Generator().manual_seed(12)
    assert torch.equal(exponential_draws(like, g), torch.empty_like(like).exponential_(1.0, generator=g_ref))


@pytest.mark.parametrize("V, B", [(5, 1), (130, 50), (1024, 8)])
def test_sample_logits_draws_what_multinomial_draws(V, B):
    """sample_logits writes out torch.multinomial's exponential race without its checks: for every seed the same
    tokens and the same generator state afterwards (what keeps samples of earlier runs reproducible)."""
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(V)) * 3
    logits[:, 0] = float("-inf")  # a filtered-out token: probability exactly 0, never drawn
    for temperature in (1.0, 0.7):
        for seed in range(20):
            g_ref, g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            ref = torch.multinomial((logits / temperature).softmax(-1), 1, generator=g_ref).squeeze(-1)
            got = sample_logits(logits, temperature, generator=g)
            assert torch.equal(got, ref)
            assert torch.equal(g.get_state(), g_ref.get_state())
            assert (got != 0).all()


class CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Elements written by copy-like operators (copy_, clone, index_put_; contiguous() copies through them)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in ("aten::copy_", "aten::clone"):
            self.elements += out.numel()
        elif name in ("aten::index_put_", "aten::_index_put_impl_"):
            self.elements += args[2].numel()  # the values written, not the whole destination
        return out


@pytest.mark.parametrize("form", ["int", "tensor"])
def test_decode_step_copies_only_the_new_position(form, monkeypatch):
    """A decode step writes each layer's new keys and values (2 B D elements) and copies nothing else: not the
    cache's earlier positions, not the memory's cross-attention keys and values (which would make the step's
    cost grow with the context beyond the attention's own reads). ATen's step: the fused CPU step's writes are
    in its C code (priors/csrc/decode_step.c: the new position's keys and values, per layer)."""
    monkeypatch.setattr(cpu_decode, "FUSED_DECODE", False)
    model = tiny(causal=True, cross_attn=True, n_layer=2)
    B, D, M = 3, model.cfg.d_model, 7
    memory = torch.randn(B, M, D, generator=torch.Generator().manual_seed(1))
    idx = torch.randint(0, 13, (B, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache()
        model(idx[:, :4], memory=memory, cache=cache)
        pos = 4 if form == "int" else cache.layers[0].positions[4:5]
        counter = CopyCounter()
        with counter:
            model.decode(idx[:, 4:5], cache, pos)
    assert counter.elements == model.cfg.n_layer * 2 * B * D
