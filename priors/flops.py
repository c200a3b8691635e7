"""Model FLOPs of sampling, counted from the architecture, and the device's measured matmul peak.

The efficiency figure of a sampler is  achieved FLOP/s / peak  with

    achieved FLOP/s = sample_flops_per_image(prior) * images / seconds of sample()
    peak            = matmul_peak_flops(device)   (a short square-matmul benchmark, measured once per run)

Counting convention (the "model FLOPs" of MFU accounting, per network call):
- matmuls: 2 FLOPs per weight per token processed, for every weight that multiplies activations
  (q/k/v/output projections, MLP, cross-attention projections, the output head); embeddings are
  lookups and count 0; biases, LayerNorms, activations and softmaxes are not matmuls and count 0;
- attention: 4 * D FLOPs per (query, key) pair and layer (scores q.k and the weighted sum of values,
  2 * hd each, over H heads), with the context lengths the path really reads: a cached step at position i
  reads i + 1 keys, an uncached causal pass over n tokens reads n(n + 1)/2 pairs (the causal kernels skip
  the masked half), a bidirectional pass n^2, cross-attention n * M;
- cross-attention keys/values of an encoder memory (M tokens): 2 * 2D^2 per memory token and layer,
  once per scale on the cached path, once per call on the uncached one.
The static (compiled) decode step reads the whole preallocated buffer with a mask; its extra, masked
reads are not model FLOPs and are not counted, so both forms of a step count the same.
Sampling arithmetic (softmax over the vocabulary, multinomial, the likelihood residual) counts 0.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from priors.transformer import TransformerConfig

if TYPE_CHECKING:  # priors.base imports nothing from here; the annotation only
    from priors.base import Prior


def matmul_weights_per_token(cfg: TransformerConfig) -> int:
    """Weights a token passes through in one forward of Transformer(cfg) (biases and embeddings excluded).

    Per layer: qkv 3D^2 + output projection D^2 + MLP 2 * 4D^2 = 12 D^2, plus cross-attention's query and
    output projections 2 D^2 (its key/value projection acts on the memory, counted separately); the head D * V.
    """
    D = cfg.d_model
    per_layer = 12 * D * D + (2 * D * D if cfg.cross_attn else 0)
    return cfg.n_layer * per_layer + D * cfg.vocab_out


def call_flops(cfg: TransformerConfig, tokens: int, pairs: int, memory: int = 0, project_memory: bool = False
               ) -> int:
    """Model FLOPs of one network call (one sequence) processing `tokens` new tokens.

    pairs: (query, key) pairs its self-attention reads, summed over the new tokens and taken once per layer;
    memory: encoder tokens each new token cross-attends to (cross_attn models); project_memory: whether this
    call also computes the memory's cross-attention keys and values (2 * 2D^2 per memory token and layer).
    """
    D, n_layer = cfg.d_model, cfg.n_layer
    flops = 2 * tokens * matmul_weights_per_token(cfg) + 4 * D * pairs * n_layer
    if cfg.cross_attn:
        flops += 4 * D * tokens * memory * n_layer
        if project_memory:
            flops += 2 * memory * 2 * D * D * n_layer
    return flops


def causal_pairs(first: int, last: int) -> int:
    """(query, key) pairs of causal self-attention for queries at positions first .. last - 1 (each reads
    positions 0 .. its own): sum of (i + 1)."""
    return (last * (last + 1) - first * (first + 1)) // 2


def decoder_sample_flops(cfg: TransformerConfig, L: int, use_cache: bool = True, memory: int = 0) -> int:
    """FLOPs of generating L tokens (one sequence) with a causal decoder, one new token per call, as the
    AR sampler and an ImageBART scale do: the call at position i feeds the start id and tokens 0 .. i - 1.

    Cached: L calls of one token, the call at position i reads i + 1 keys (and the memory is projected
    once, by the first call). Uncached: the call at position i recomputes all i + 1 positions (head
    included: the full forward's logits are computed for every position) and the memory projection.
    """
    if use_cache:
        return sum(call_flops(cfg, 1, i + 1, memory, project_memory=i == 0) for i in range(L))
    return sum(call_flops(cfg, i + 1, causal_pairs(0, i + 1), memory, project_memory=True) for i in range(L))


def encoder_flops(cfg: TransformerConfig, L: int) -> int:
    """One bidirectional pass over L tokens (an ImageBART encoder, an absorbing-diffusion step): L^2 pairs."""
    return call_flops(cfg, L, L * L)


def sample_flops_per_image(prior: Prior, use_cache: bool | None = None) -> float | None:
    """Model FLOPs one image of prior.sample() costs (Prior.sample_flops), or None when the prior does not count
    them. use_cache: None = the path sample() takes; False / True = the uncached / cached decoder path."""
    flops = prior.sample_flops(use_cache=use_cache)
    return None if flops is None else float(flops)


# ---- the device's peak ---------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device | str, seconds: float = 1.0, n: int | None = None) -> float:
    """The best FLOP/s of square n x n matmuls over about `seconds`: float32 on a CPU (at the current
    torch.get_num_threads()), bf16 on CUDA (the precision the harness samples in). n defaults to 1024 on a
    CPU and 8192 on CUDA. The best of many short timings, so a busy moment lowers it less than a mean would.
    """
    device = torch.device(device)
    if device.type == "cuda":
        dtype, n = torch.bfloat16, n or 8192
    else:
        dtype, n = torch.float32, n or 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, thread pool, allocator
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        t = time.perf_counter() - t0
        best = min(best, t)
        if t0 + t - start >= seconds:
            break
    return 2 * n ** 3 / best
