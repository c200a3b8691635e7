"""The sampling paths of issue 16 give the same samples, and the efficiency figure counts what runs.

Paths: uncached (the whole prefix recomputed per token), eager cached (one token per call, int positions,
attention over the written prefix), and compiled (torch.compile of the decode step in its static form: a
tensor position, attention over the whole preallocated buffer with a mask; absorbing: the full pass).
The static form changes float order only (masked keys get weight exactly 0), so the logits agree to ~1e-6
and, for the seeds below, the tokens are identical; the test says "token-identical" and checks exactly that.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import priors.transformer as tf
from priors import cpu_decode
from priors import build_prior
from priors.flops import (call_flops, decoder_sample_flops, encoder_flops, matmul_peak_flops,
                          matmul_weights_per_token, sample_flops_per_image)
from priors.transformer import TransformerConfig
from tests.toy_prior import ToyPrior

pytestmark = pytest.mark.usefixtures("one_thread")

PRIORS = ("ar", "imagebart", "absorbing")
# The smoke preset's shapes (conf/experiment/smoke.yaml: 150k parameters, 2 layers; vqgan_smoke: 64 codes)
# on a 4x4 grid; ImageBART at T=3 has one encoder-decoder scale and the decoder-only last scale.
V, GRID, BUDGET, T = 64, (4, 4), 150_000, 3


def smoke_prior(name: str, seed: int = 0):
    torch.manual_seed(seed)
    prior = build_prior(name, V, GRID, T=T, budget=BUDGET, cfg={"n_layer": 2})
    # Weights far from the 0.02 init, so that the conditionals are far from uniform and a wrong step shows.
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(8.0)
    return prior.eval()


def draw(prior, use_cache: bool = True, n: int = 5, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if hasattr(prior, "sample_scale"):  # ImageBART: the whole chain, with or without the decoders' cache
        prior.sample_cfg.use_cache = use_cache
        try:
            return prior.sample(n, g)
        finally:
            prior.sample_cfg.use_cache = True
    if use_cache:
        return prior.sample(n, g)
    return prior.sample(n, g, use_cache=False)


@pytest.fixture
def dynamo_capture(monkeypatch):
    """Compiled paths through dynamo's graph capture only (backend "eager"): the same static graphs as
    inductor would compile, in seconds, so the default test run covers them."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(tf, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["ar", "imagebart"])
def test_cached_equals_uncached_token_for_token(name):
    prior = smoke_prior(name)
    assert torch.equal(draw(prior, use_cache=True), draw(prior, use_cache=False))


@pytest.mark.parametrize("name", PRIORS)
def test_captured_static_step_equals_eager_token_for_token(name, dynamo_capture):
    from torch._dynamo.utils import counters

    prior = smoke_prior(name)
    eager = draw(prior)
    prior.set_compile("on")
    try:
        assert torch.equal(draw(prior), eager)
        assert torch.equal(draw(prior, n=3), draw_eager(prior, n=3))  # another batch size: another graph
    finally:
        prior.set_compile("off")
    # The steps really went through captured graphs: ImageBART's two scales (encoder-decoder, decoder-only)
    # are two architectures, and each batch size is one more graph.
    assert counters["stats"]["unique_graphs"] == (4 if name == "imagebart" else 2)


def draw_eager(prior, n: int):
    mode = prior.compile_mode
    prior.set_compile("off")
    try:
        return draw(prior, n=n)
    finally:
        prior.set_compile(mode)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRIORS)
def test_inductor_compiled_equals_eager_token_for_token(name):
    """The real compiled path (inductor; tens of seconds of compilation per graph on 2 CPU cores)."""
    prior = smoke_prior(name)
    eager = draw(prior)
    prior.set_compile("on")
    try:
        t0 = time.perf_counter()
        first = draw(prior)  # compiles
        print(f"{name}: first compiled sample() {time.perf_counter() - t0:.1f} s")
        assert torch.equal(first, eager)
        assert torch.equal(draw(prior), eager)  # reuses the graph
    finally:
        prior.set_compile("off")


def test_set_compile_rejects_unknown_modes():
    prior = smoke_prior("ar")
    assert prior.compile_mode == "off"
    with pytest.raises(ValueError, match="compile mode 'auto' is not one of: off, on"):
        prior.set_compile("auto")  # `auto` is the harness's choice, resolved before it reaches a prior


def test_completion_through_the_captured_step_keeps_kept_tokens(dynamo_capture):
    prior = smoke_prior("ar")
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, V, (4, 16), generator=g)
    keep = torch.arange(16) >= 8  # keep the lower half (upper-half completion)
    keep = keep.expand(4, 16).clone()
    keep[0, 3] = True  # one row also keeps a position inside the generated range
    eager = prior.complete(x, keep, torch.Generator().manual_seed(5))
    prior.set_compile("on")
    try:
        out = prior.complete(x, keep, torch.Generator().manual_seed(5))
    finally:
        prior.set_compile("off")
    assert torch.equal(out, eager) and torch.equal(out[keep], x[keep])


# ---- the efficiency figure --------------------------------------------------------------------------

def test_flops_hand_count_on_a_tiny_ar_model():
    """AR with V=5, L=3 tokens, one layer, D=4 (2 heads):
    weights per token: qkv 4*12 + proj 4*4 + fc 4*16 + proj 16*4 = 12 * 16 = 192, head 4 * 5 = 20 -> 212.
    Cached sample(): 3 calls of one token at positions 0, 1, 2 reading 1, 2, 3 keys:
        matmuls 3 * 2 * 212 = 1272, attention 4 * D * (1 + 2 + 3) = 96              -> 1368 per image.
    Uncached: the call at position i runs i + 1 tokens, causal pairs 1, 3, 6:
        (2 * 212 + 16 * 1) + (2 * 2 * 212 + 16 * 3) + (3 * 2 * 212 + 16 * 6) = 440 + 896 + 1368 = 2704.
    Absorbing-style bidirectional pass over the 3 tokens (head 4 * 5 as well): 3 * 424 + 16 * 9 = 1416."""
    cfg = TransformerConfig(vocab_in=6, vocab_out=5, seq_len=3, n_layer=1, n_head=2, d_model=4, causal=True)
    assert matmul_weights_per_token(cfg) == 212
    assert decoder_sample_flops(cfg, 3, use_cache=True) == 1368
    assert decoder_sample_flops(cfg, 3, use_cache=False) == 2704
    assert encoder_flops(cfg, 3) == 1416
    # Cross-attention (ImageBART decoder), one layer, D=4, M=2 memory tokens, one new token reading 1 key:
    # weights 12*16 + q and out projections 2*16 + head 20 = 244 -> 488; self-attention 16 * 1; cross 16 * 2;
    # the memory's keys/values 2 * M * 2 * D^2 = 128 when this call projects it.
    xcfg = TransformerConfig(vocab_in=6, vocab_out=5, seq_len=3, n_layer=1, n_head=2, d_model=4, causal=True,
                             cross_attn=True)
    assert call_flops(xcfg, 1, 1, memory=2) == 488 + 16 + 32
    assert call_flops(xcfg, 1, 1, memory=2, project_memory=True) == 488 + 16 + 32 + 128


def counted_flops(prior, n: int = 3) -> int:
    """FLOPs torch's own FlopCounterMode sees in prior.sample(n): every mm/addmm/bmm, plus the CPU SDPA kernel
    (which it does not count by itself) by its standard formula, 4 * B * H * q_len * k_len * hd."""
    def sdpa_cpu(q, k, v, *args, **kwargs):
        return sdpa_flop_count(q, k, v)

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu})
    with counter:
        draw(prior, n=n)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", PRIORS)
def test_flops_per_image_equal_what_torch_counts_in_sample(name, monkeypatch):
    """The architecture count equals, to the FLOP, what FlopCounterMode records while sample() runs, on ATen's
    path (the counter sees ATen's operators; the fused CPU code makes the same products, priors/cpu_decode.py)."""
    monkeypatch.setattr(cpu_decode, "FUSED_DECODE", False)
    prior = smoke_prior(name)
    assert counted_flops(prior, n=3) == 3 * sample_flops_per_image(prior)


def test_uncached_flops_exceed_cached_by_the_prefix_recomputation():
    prior = smoke_prior("ar")
    cached, uncached = sample_flops_per_image(prior), sample_flops_per_image(prior, use_cache=False)
    L = prior.seq_len
    # Roughly (L + 1) / 2 times the matmul work: the call at position i recomputes i + 1 positions.
    assert 0.8 * (L + 1) / 2 < uncached / cached < 1.2 * (L + 1) / 2
    assert sample_flops_per_image(ToyPrior(4, (2, 2))) is None  # a prior that declares no count (Prior's default)


def test_matmul_peak_is_measured():
    peak = matmul_peak_flops("cpu", seconds=0.05, n=256)
    assert 1e8 < peak < 1e13  # FLOP/s of one or two CPU cores


@pytest.mark.parametrize("name", ["ar", "imagebart"])
def test_cached_loop_runs_on_decode_threads_and_restores_the_callers(name, monkeypatch):
    """The cached decoding loop runs with DECODE_THREADS intra-op threads; the uncached path and ImageBART's encoder
    keep the caller's, and the caller's setting is back afterwards (also with DECODE_THREADS = None: untouched).
    "auto" (the default): one thread under OMP_WAIT_POLICY=passive (the tests' policy), the caller's under any
    other (the variable is read when the loop starts; OpenMP itself read it when torch loaded)."""
    prior = smoke_prior(name)
    seen = {"decode": set(), "forward": set()}
    for m in prior.modules():
        if isinstance(m, tf.Transformer):
            m.register_forward_hook(lambda *a: seen["forward"].add(torch.get_num_threads()))
            real = m.decode
            m.decode = lambda *a, real=real, **k: seen["decode"].add(torch.get_num_threads()) or real(*a, **k)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        assert tf.DECODE_THREADS == "auto" and tf.decode_thread_limit() == 1
        draw(prior, use_cache=True)
        assert seen["decode"] == {1} and torch.get_num_threads() == 2
        if name == "imagebart":
            assert 2 in seen["forward"]  # the encoder pass, before the loop
        seen["forward"].clear()
        draw(prior, use_cache=False)
        assert seen["forward"] == {2} and torch.get_num_threads() == 2
        for policy in ("active", ""):  # spinning, or OpenMP's default (spin, then sleep)
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            assert tf.decode_thread_limit() is None
            seen["decode"].clear()
            draw(prior, use_cache=True)
            assert seen["decode"] == {2} and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        monkeypatch.setattr(tf, "DECODE_THREADS", None)
        seen["decode"].clear()
        draw(prior, use_cache=True)
        assert seen["decode"] == {2}
    finally:
        torch.set_num_threads(before)
