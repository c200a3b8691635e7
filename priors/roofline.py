"""Bytes a sampler reads, the device's read bandwidth, and a sampler's share of its roofline.

A cached decode step does little arithmetic per byte: it reads every weight of the network for one token per row,
and the keys/values of every earlier position. Its share of the matmul peak alone would call a step that
runs at the memory's speed inefficient, so a cached path is measured against its roofline:

    roofline seconds = max(FLOPs / peak FLOP/s, bytes read / read bandwidth)
    share            = roofline seconds / measured seconds

with the model FLOPs of priors/flops.py, the peak of priors.flops.matmul_peak_flops and the bandwidth of
read_bandwidth(). A share means the same for a bandwidth-bound step and a compute-bound one.

Counting convention for bytes read (per network call, one batch of B rows):
- every matmul weight (the weights priors/flops.py counts FLOPs for) once per call, whatever B: a call reads
  the weights once for all its rows; embedding rows, biases and LayerNorm parameters are a vector each and
  count 0;
- attention: the keys and values each query block reads, once per layer and row: a cached step at position
  i reads i + 1 keys and values, a causal or bidirectional pass over n tokens reads its n keys and values,
  cross-attention the M memory keys and values (and, when the call projects the memory, the memory once);
- activations of the new tokens count 0 (a few rows of width D, written and read from cache).
Elements are `itemsize` bytes (4: float32, the CPU's compute precision; 2 for bf16 weights on CUDA).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from priors.flops import _sync, matmul_weights_per_token
from priors.transformer import TransformerConfig


def call_bytes(cfg: TransformerConfig, batch: int, context: int, memory: int = 0, project_memory: bool = False,
               itemsize: int = 4) -> int:
    """Bytes one network call of `batch` rows reads: the matmul weights once, and per layer and row the keys and
    values of `context` positions (and of `memory` encoder tokens for cross-attention; project_memory: this call
    also reads the memory (B, M, D) and its key/value projection 2D^2 per layer)."""
    D, n_layer = cfg.d_model, cfg.n_layer
    elements = matmul_weights_per_token(cfg) + 2 * batch * context * D * n_layer
    if cfg.cross_attn:
        elements += 2 * batch * memory * D * n_layer
        if project_memory:
            elements += batch * memory * D + 2 * D * D * n_layer
    return elements * itemsize


def decoder_sample_bytes(cfg: TransformerConfig, L: int, batch: int, use_cache: bool = True, memory: int = 0,
                         itemsize: int = 4) -> int:
    """Bytes read generating L tokens for `batch` rows, one call per token as priors.flops.decoder_sample_flops
    counts them: cached, the call at position i reads i + 1 keys/values (the first call also projects the
    memory); uncached, the call at position i recomputes i + 1 positions (its causal attention reads them)."""
    return sum(call_bytes(cfg, batch, i + 1, memory, project_memory=i == 0 or not use_cache, itemsize=itemsize)
               for i in range(L))


def encoder_bytes(cfg: TransformerConfig, L: int, batch: int, itemsize: int = 4) -> int:
    """One bidirectional pass over L tokens for `batch` rows."""
    return call_bytes(cfg, batch, L, itemsize=itemsize)


def sample_bytes(prior: Any, batch: int, use_cache: bool | None = None, itemsize: int = 4) -> int | None:
    """Bytes one prior.sample(batch) reads, for the priors of this package (None for any other): AR, L decoder
    calls; ImageBART, per scale its encoder pass and L decoder calls; absorbing, T full passes.
    use_cache: None = the path sample() takes (ImageBART: its `sample.use_cache`), as sample_flops."""
    name, L = getattr(prior, "name", None), getattr(prior, "seq_len", None)
    if name == "ar":
        return decoder_sample_bytes(prior.model.cfg, L, batch, use_cache is not False, itemsize=itemsize)
    if name == "imagebart":
        use_cache = prior.sample_cfg.use_cache if use_cache is None else use_cache
        total = 0
        for t in range(2, prior.T + 1):
            scale = prior.scales[f"scale{t}"]
            memory = 0 if scale.encoder is None else L
            if scale.encoder is not None:
                total += encoder_bytes(scale.encoder.cfg, L, batch, itemsize)
            total += decoder_sample_bytes(scale.decoder.cfg, L, batch, use_cache, memory, itemsize)
        return total
    if name == "absorbing":
        return prior.T * encoder_bytes(prior.model.cfg, L, batch, itemsize)
    return None


def read_bandwidth(device: torch.device | str, seconds: float = 1.0, nbytes: int | None = None) -> float:
    """The best bytes/s of reading a float32 buffer of nbytes (a sum over it: reads, no writes) over about
    `seconds`, at the current thread count. nbytes defaults to 256 MiB on a CPU (far beyond its caches) and
    2 GiB on CUDA. The best of many timings, like matmul_peak_flops."""
    device = torch.device(device)
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    x = torch.ones(nbytes // 4, device=device)
    out = torch.empty(1, device=device)
    torch.sum(x, dim=0, keepdim=True, out=out)  # warm-up: pages touched, thread pool started
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        torch.sum(x, dim=0, keepdim=True, out=out)
        _sync(device)
        t = time.perf_counter() - t0
        best = min(best, t)
        if t0 + t - start >= seconds:
            break
    return x.numel() * 4 / best


def roofline_seconds(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
    """The least time the work can take on the device: compute-bound or bandwidth-bound, whichever is slower."""
    return max(flops / peak_flops, nbytes / bandwidth)
