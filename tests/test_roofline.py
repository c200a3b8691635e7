"""The roofline of a sampler: bytes read counted from the architecture, checked against what a decode step's
operators really read, and the device's read bandwidth."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from priors import build_prior, cpu_decode
from priors.roofline import (call_bytes, decoder_sample_bytes, encoder_bytes, read_bandwidth, roofline_seconds,
                             sample_bytes)
from priors.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bytes_hand_count_on_a_tiny_model():
    """AR with V=5, one layer, D=4: 212 matmul weights (tests/test_sampling_paths.py's hand count), float32.
    A call of 2 rows over 3 positions reads the weights once and 2 (K, V) * 2 rows * 3 * D keys/values:
    (212 + 48) * 4 = 1040 bytes. Cached sampling of L=3 tokens for 2 rows: steps read 1, 2, 3 positions:
    (3 * 212 + 2 * 2 * 4 * (1 + 2 + 3)) * 4 = 2928. Uncached: the same here (its call at position i reads i + 1
    positions too, and this model has no memory to re-project)."""
    cfg = TransformerConfig(vocab_in=6, vocab_out=5, seq_len=3, n_layer=1, n_head=2, d_model=4, causal=True)
    assert call_bytes(cfg, batch=2, context=3) == 1040
    assert decoder_sample_bytes(cfg, 3, batch=2, use_cache=True) == 2928
    assert decoder_sample_bytes(cfg, 3, batch=2, use_cache=False) == 2928
    assert encoder_bytes(cfg, 3, batch=2) == 1040
    assert call_bytes(cfg, batch=2, context=3, itemsize=2) == 520  # bf16
    # Cross-attention, M=2 memory tokens, one row: weights 244 (qkv, out, MLP 12 D^2 + the cross q and out
    # projections 2 D^2 + head 20), 1 self key/value pair 2 * 4, 2 memory pairs 2 * 2 * 4: (244 + 8 + 16) * 4;
    # projecting the memory also reads it (2 * 4) and its key/value weights (2 D^2 = 32).
    xcfg = TransformerConfig(vocab_in=6, vocab_out=5, seq_len=3, n_layer=1, n_head=2, d_model=4, causal=True,
                             cross_attn=True)
    assert call_bytes(xcfg, 1, 1, memory=2) == 1072
    assert call_bytes(xcfg, 1, 1, memory=2, project_memory=True) == 1072 + (8 + 32) * 4


class MatmulReads(TorchDispatchMode):
    """Bytes the matmul operators (addmm, mm, bmm) read: every tensor argument, whole."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("aten::addmm", "aten::mm", "aten::bmm"):
            self.bytes += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pos", [1, 5, 9])
def test_a_decode_step_reads_what_the_count_says(pos, monkeypatch):
    """The matmuls of one eager decode step at position pos read exactly the counted weights and keys/values
    (pos + 1 positions: the filled part of the cache, not the whole buffer), plus their activations and biases:
    per layer the biases 9 D (qkv 3D, out D, MLP 4D + D), the rows entering the four projections 7 B D (D, D, D,
    4D), the query B D and the attention weights B H (pos + 1); the final rows B D into the head. ATen's step (the
    mode sees ATen's operators; the fused CPU step reads the same weights and keys/values, priors/cpu_decode.py)."""
    monkeypatch.setattr(cpu_decode, "FUSED_DECODE", False)
    torch.manual_seed(0)
    B, D, H, n_layer = 3, 16, 2, 2
    cfg = TransformerConfig(vocab_in=13, vocab_out=11, seq_len=12, n_layer=n_layer, n_head=H, d_model=D, causal=True)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 13, (B, pos + 1))
    with torch.no_grad():
        cache = model.new_cache()
        model(idx[:, :pos], cache=cache)
        reads = MatmulReads()
        with reads:
            model.decode(idx[:, pos:], cache, pos)
    activations = n_layer * (9 * D + 7 * B * D + B * D + B * H * (pos + 1)) + B * D
    assert reads.bytes == call_bytes(cfg, B, pos + 1) + 4 * activations


def test_sample_bytes_of_the_priors():
    V, grid, budget = 64, (4, 4), 150_000
    ar = build_prior("ar", V, grid, T=3, budget=budget, cfg={"n_layer": 2})
    L, cfg = ar.seq_len, ar.model.cfg
    assert sample_bytes(ar, 5) == decoder_sample_bytes(cfg, L, 5)
    # Per image, the weights' share shrinks with the batch; the keys/values' does not.
    assert sample_bytes(ar, 10) / 10 < sample_bytes(ar, 5) / 5
    ib = build_prior("imagebart", V, grid, T=3, budget=budget, cfg={"n_layer": 2})
    s2, s3 = ib.scales["scale2"], ib.scales["scale3"]
    assert sample_bytes(ib, 5) == (encoder_bytes(s2.encoder.cfg, L, 5) + decoder_sample_bytes(s2.decoder.cfg, L, 5,
                                   memory=L) + decoder_sample_bytes(s3.decoder.cfg, L, 5))
    ab = build_prior("absorbing", V, grid, T=3, budget=budget, cfg={"n_layer": 2})
    assert sample_bytes(ab, 5) == ab.T * encoder_bytes(ab.model.cfg, L, 5)
    assert sample_bytes(object(), 5) is None  # not a prior of this package


def test_read_bandwidth_is_measured_and_the_roofline_takes_the_slower_bound():
    bw = read_bandwidth("cpu", seconds=0.05, nbytes=16 << 20)
    assert 1e8 < bw < 1e13  # bytes/s of one or two CPU cores' memory
    assert roofline_seconds(2e9, 1e6, peak_flops=1e9, bandwidth=1e9) == 2.0  # compute-bound
    assert roofline_seconds(1e6, 3e9, peak_flops=1e9, bandwidth=1e9) == 3.0  # bandwidth-bound
