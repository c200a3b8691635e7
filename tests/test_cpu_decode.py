"""The fused CPU code (priors/cpu_decode.py, priors/csrc/decode_step.c) against ATen's step and pass.

Its logits differ from ATen's by float rounding only, so they are compared within the rounding bound of a
transformer's logits (tests/tolerance.py: both routes within that bound of the exact value), under every vector
instruction set the CPU has. Batch and thread splits change no bit. The samplers' tokens against the uncached path
are tests/test_sampling_paths.py's (the fused code is the default cached path there).
"""
from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest
import torch

import priors.cpu_decode as cd
import priors.transformer as tf
from priors.transformer import Transformer, TransformerConfig, full_logits
from tests import tolerance as T

V, L = 20, 12


def make(causal: bool = True, cross: bool = False, head: bool = True, d: int = 24, n_head: int = 3,
         n_layer: int = 2, attn_dim: int | None = None, head_bias: bool = False, seed: int = 0) -> Transformer:
    """A small transformer with every parameter perturbed (biases and LayerNorm parameters away from their 0 / 1
    initialisation, weights of scale ~0.5), so that each enters the logits and the conditionals are far from
    uniform. d_model 24 with 3 heads of 8: widths that are no multiple of any vector width."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_in=V + 1, vocab_out=V if head else 0, seq_len=L, n_layer=n_layer, n_head=n_head,
                            d_model=d, causal=causal, cross_attn=cross, attn_dim=attn_dim, head_bias=head_bias)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8.0).add_(0.3 * torch.randn_like(p))
    return m


def bound(m: Transformer, ref: torch.Tensor, memory: int = 0) -> float:
    """Largest |fused - ATen| two correct float32 routes may differ by: each within transformer_error of the exact
    logits (relative to their largest magnitude)."""
    cfg = m.cfg
    return 2 * T.transformer_error(max(cfg.d_model, cfg.inner_dim), cfg.n_layer, cfg.seq_len, memory) * float(
        ref.abs().max())


def decode_all(m: Transformer, x: torch.Tensor, prefix: int, memory: torch.Tensor | None = None,
               fused: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], tf.KVCache]:
    """Prefill positions 0 .. prefix - 1, then one decode step per remaining position: (prefill logits, step
    logits, the cache)."""
    before = cd.FUSED_DECODE
    cd.FUSED_DECODE = "auto" if fused else False
    try:
        with torch.no_grad():
            cache = m.new_cache()
            first = m(x[:, :prefix], memory=memory, cache=cache)
            steps = [m.decode(x[:, i:i + 1], cache, i)[:, 0] for i in range(prefix, x.shape[1])]
    finally:
        cd.FUSED_DECODE = before
    return first, steps, cache


@pytest.fixture(autouse=True)
def fused_available():
    lib, why = cd.library()
    if lib is None:
        pytest.fail(f"the fused code does not build on this machine: {why}")


@pytest.mark.parametrize("kind", ["gpt", "decoder", "decoder_attn_dim"])
@pytest.mark.parametrize("prefix", [1, 4])
def test_fused_prefill_and_steps_match_aten(kind, prefix):
    """Prefill and steps of an AR model, and of an ImageBART-style decoder that cross-attends to a memory (also
    with attention heads narrower than d_model and a head bias), within the rounding bound of ATen's; the ATen
    cache the fused code writes (self- and cross-attention keys and values) within it too."""
    cross = kind != "gpt"
    m = make(cross=cross, attn_dim=12 if kind == "decoder_attn_dim" else None, head_bias=kind == "decoder_attn_dim")
    x = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(1))
    memory = torch.randn(5, 7, m.cfg.d_model, generator=torch.Generator().manual_seed(2)) if cross else None
    f_first, f_steps, f_cache = decode_all(m, x, prefix, memory)
    a_first, a_steps, a_cache = decode_all(m, x, prefix, memory, fused=False)
    assert isinstance(f_cache.fused, cd.FusedStep) and a_cache.fused is False
    ref = torch.cat([a_first] + [s[:, None] for s in a_steps], 1)
    got = torch.cat([f_first] + [s[:, None] for s in f_steps], 1)
    tol = bound(m, ref, memory=7 if cross else 0)
    assert (got - ref).abs().max() <= tol
    assert (got - ref).abs().max() > 0 or prefix == 1  # a different route: rounding shows somewhere
    for f, a in zip(f_cache.layers, a_cache.layers):
        scale = float(a.kv.abs().max())
        assert (f.kv - a.kv).abs().max() <= tol / float(ref.abs().max()) * scale * 10
        if cross:
            assert torch.allclose(f.cross_k, a.cross_k, rtol=0, atol=T.gamma_random(m.cfg.d_model) * 10 * float(
                a.cross_k.abs().max()) * 10)


@pytest.mark.parametrize("causal,head", [(False, False), (False, True), (True, True)])
def test_fused_pass_matches_aten_forward(causal, head):
    """full_logits without a cache: an ImageBART encoder (bidirectional, hidden states), absorbing's network
    (bidirectional, logits) and a causal one; also at a length below seq_len."""
    m = make(causal=causal, head=head)
    x = torch.randint(0, V, (6, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for n in (L, 7):
            ref, got = m(x[:, :n]), full_logits(m, x[:, :n])
            assert got.shape == ref.shape == (6, n, V if head else m.cfg.d_model)
            assert (got - ref).abs().max() <= bound(m, ref)
        with torch.enable_grad():
            assert full_logits(m, x).requires_grad  # under autograd: ATen's forward, not the fused pass


def test_fused_results_do_not_depend_on_the_batch_split_or_the_threads():
    """Each row is computed by the same operations whatever the batch size, the rows' block or the thread that
    takes it: the logits are the same bit for bit."""
    m = make(cross=True)
    x = torch.randint(0, V, (6, L), generator=torch.Generator().manual_seed(4))
    memory = torch.randn(6, 5, m.cfg.d_model, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[threads] = decode_all(m, x, 2, memory)
        split = [decode_all(m, x[i:j], 2, memory[i:j]) for i, j in ((0, 1), (1, 6))]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            enc = make(causal=False, head=False)
            with torch.no_grad():
                whole = full_logits(enc, x)
                parts = torch.cat([full_logits(enc, x[:1]), full_logits(enc, x[1:])])
            assert torch.equal(whole, parts)
    finally:
        torch.set_num_threads(before)
    for a, b in zip([runs[1][0]] + runs[1][1], [runs[2][0]] + runs[2][1]):
        assert torch.equal(a, b)
    joined = [torch.cat([split[0][0], split[1][0]])] + [torch.cat(p) for p in zip(split[0][1], split[1][1])]
    for a, b in zip([runs[1][0]] + runs[1][1], joined):
        assert torch.equal(a, b)


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.parametrize("capability,width,needs", [("AVX512", 16, {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
                                                    ("AVX2", 8, {"avx2", "fma"}), ("DEFAULT", 4, set())])
def test_every_vector_width_matches_aten(monkeypatch, capability, width, needs):
    """The C file compiled for each ATen CPU capability this CPU can run (the flags follow ATEN_CPU_CAPABILITY),
    each a different vector width and padding, within the rounding bound of ATen."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("instruction sets of x86-64")
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())}")
    monkeypatch.setattr(cd, "capability", lambda: capability)
    monkeypatch.setattr(cd, "_LIBRARY", None)
    flags = cd.compile_flags()
    assert ("-mavx512f" in flags) == (capability == "AVX512") and ("-mavx2" in flags) == (capability != "DEFAULT")
    lib, why = cd.library()
    assert lib is not None, why
    assert lib.pb_vector_width() == width
    m = make(cross=True)
    x = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(6))
    memory = torch.randn(5, 9, m.cfg.d_model, generator=torch.Generator().manual_seed(7))
    f = decode_all(m, x, 1, memory)
    a = decode_all(m, x, 1, memory, fused=False)
    ref = torch.stack(a[1])
    assert (torch.stack(f[1]) - ref).abs().max() <= bound(m, ref, memory=9)


def test_a_step_after_an_aten_forward_reads_what_it_wrote():
    """The fused code keeps its own copy of the cache: a forward call that rewrites positions (here 3 and 4,
    through ATen) makes the next fused step copy them again, so it equals a step on a cache ATen filled alone."""
    m = make()
    x = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(8))
    y = torch.randint(0, V, (4, 2), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, _, cache = decode_all(m, x[:, :6], 1)
        cache.length = 3
        m(y, cache=cache)  # positions 3, 4 rewritten
        got = m.decode(x[:, 5:6], cache, 5)[:, 0]
        z = torch.cat([x[:, :3], y, x[:, 5:6]], 1)
        ref = m(z)[:, -1]
    assert (got - ref).abs().max() <= bound(m, ref)


def test_buffers_are_shared_only_once_their_cache_is_gone():
    """Two caches alive at once each keep their own buffers (interleaved steps give each one's own logits); once a
    cache is freed, the next cache of the same shapes takes its buffers (no new allocation)."""
    m = make()
    x = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(10))
    y = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(11))
    alone_x, alone_y = decode_all(m, x, 1)[1], decode_all(m, y, 1)[1]
    with torch.no_grad():
        a, b = m.new_cache(), m.new_cache()
        m(x[:, :1], cache=a)
        m(y[:, :1], cache=b)
        for i in range(1, L):
            assert torch.equal(m.decode(x[:, i:i + 1], a, i)[:, 0], alone_x[i - 1])
            assert torch.equal(m.decode(y[:, i:i + 1], b, i)[:, 0], alone_y[i - 1])
        assert a.layers[0].kv.data_ptr() != b.layers[0].kv.data_ptr()
        ptr = a.layers[0].kv.data_ptr()
        del a
        gc.collect()
        c = m.new_cache()
        m(x[:, :1], cache=c)
        assert c.layers[0].kv.data_ptr() == ptr
        assert torch.equal(m.decode(x[:, 1:2], c, 1)[:, 0], alone_x[0])


def test_a_token_id_outside_the_embedding_raises():
    m = make()
    x = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        cache = m.new_cache()
        m(x[:, :1], cache=cache)
        with pytest.raises(IndexError, match="outside the embedding's 21 rows"):
            m.decode(torch.tensor([[3], [21]]), cache, 1)
        with pytest.raises(IndexError, match="outside the embedding"):
            full_logits(make(causal=False), torch.tensor([[0, 25]]))


def test_without_a_compiler_sampling_takes_the_aten_step_and_says_so_once(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(cd, "_LIBRARY", None)
    monkeypatch.setattr(cd, "_WARNED", False)
    m = make()
    x = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(13))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = decode_all(m, x, 1)
        decode_all(m, x, 1)
    notes = [w for w in seen if "fused CPU decode step unavailable" in str(w.message)]
    assert len(notes) == 1 and "/nonexistent/cc" in str(notes[0].message)
    assert first[2].fused is False
    monkeypatch.setattr(cd, "FUSED_DECODE", True)
    with pytest.raises(RuntimeError, match="FUSED_DECODE=True but the fused decode step is unavailable"):
        with torch.no_grad():
            m(x[:, :1], cache=m.new_cache())


@pytest.mark.parametrize("cross", [False, True])
def test_the_memory_figures_count_what_the_fused_code_allocates(cross):
    """bench/memory.py's figures of the fused code (priors.cpu_decode.floats_per_row, packed_floats) are its
    allocations: the packed weights, and per batch row a step's cache copy and scratch, exactly."""
    m = make(cross=cross)
    x = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(14))
    memory = torch.randn(4, L, m.cfg.d_model, generator=torch.Generator().manual_seed(15)) if cross else None
    _, _, cache = decode_all(m, x, 1, memory)
    step, lay = cache.fused, cd.layout()
    pack = step.pack
    weights = [t for p in pack.layers for t in p.values() if isinstance(t, torch.Tensor)]
    weights += [pack.lnf_w, pack.lnf_b, pack.head_w, pack.head_b]
    assert sum(t.numel() for t in weights) == cd.packed_floats(m.cfg, lay)
    own = sum(t.numel() for k in ("scratch", "kt", "v", "ck", "cv") for t in (
        step.buf[k] if isinstance(step.buf[k], list) else [step.buf[k]]))
    assert own == 4 * cd.floats_per_row(m.cfg, lay)
