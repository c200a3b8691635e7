"""The one transformer every prior is built from (nanoGPT-style, pre-LayerNorm).

- AR prior (Taming Transformers): causal, no cross-attention.
- ImageBART: a bidirectional encoder (vocab_out = 0, returns hidden states) and a
  causal decoder that cross-attends to the encoder memory.
- Absorbing diffusion (Unleashing Transformers): bidirectional, no cross-attention.

Autoregressive sampling goes through a `KVCache`: the self-attention keys and
values of every position seen so far, and the cross-attention keys and values of
the memory (computed once, since the memory does not change while decoding).
Without it, sampling L tokens recomputes the whole prefix at every step.

The cache is static: (B, H, seq_len, hd) buffers allocated once by the first
(prefill) call, then written by index. `Transformer.decode` is the one-token step
of a sampling loop, with two forms of the position argument:
- a Python int (eager): attention reads the written prefix only;
- a (1,) tensor (static shapes): attention reads the whole buffer with the
  positions after it masked, so one graph serves every step. This is the form
  `torch.compile` (and CUDA graphs) capture; `compiled()` holds the compiled steps.
Neither form allocates cache memory, syncs with the host or grows a tensor per step.

Callers apply bf16 autocast on CUDA; nothing here casts to float32 explicitly.
"""
from __future__ import annotations

import gc
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from priors import cpu_decode


@dataclass
class TransformerConfig:
    vocab_in: int  # size of the input embedding table (V plus the prior's special ids)
    vocab_out: int  # size of the output logits; 0 = no head, forward returns final hidden states (B, L, D)
    seq_len: int  # number of learned positions (the longest sequence forward accepts)
    n_layer: int  # number of transformer blocks
    n_head: int  # attention heads per block; d_model must be a multiple of it
    d_model: int  # width D of the residual stream
    causal: bool  # causal self-attention (AR, ImageBART decoder) or bidirectional (absorbing, encoder)
    cross_attn: bool = False  # every block also cross-attends to an encoder memory (B, M, D)
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches (training only)
    # Width of the attention's queries, keys and values (n_head heads of attn_dim / n_head each); None = d_model.
    # Released models whose heads have a fixed size (e.g. 16 heads of 64 at d_model 752) set it.
    attn_dim: int | None = None
    head_bias: bool = False  # a bias on the output logits (released encoder-decoder models have one)

    def __post_init__(self):
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")
        if self.attn_dim is not None and self.attn_dim % self.n_head != 0:
            raise ValueError(f"attn_dim={self.attn_dim} is not a multiple of n_head={self.n_head}")

    @property
    def inner_dim(self) -> int:
        """The attention's width: attn_dim, or d_model when it is not set."""
        return self.d_model if self.attn_dim is None else self.attn_dim


class LayerKV:
    """The cached keys/values of one block: self-attention written position by position, cross-attention fixed."""

    def __init__(self, capacity: int):
        self.capacity = capacity  # the model's seq_len: buffers are allocated once at this length
        # Keys and values share one buffer (2, B, H, capacity, hd), so that a decode step writes both with one copy.
        self.kv: torch.Tensor | None = None
        self.k: torch.Tensor | None = None  # (B, H, capacity, hd), a view of kv[0]
        self.v: torch.Tensor | None = None  # (B, H, capacity, hd), a view of kv[1]
        self.cross_k: torch.Tensor | None = None  # (B, H, M, hd), keys of the memory
        self.cross_v: torch.Tensor | None = None  # (B, H, M, hd), values of the memory
        self.positions: torch.Tensor | None = None  # arange(capacity) on the buffers' device: the static mask
        # Views of kv made once at allocation for the eager decode step, which would otherwise build them from
        # slices, selects and transposes at every token: by_pos[i] (2, B, H, hd) is position i's keys and values;
        # kt (B*H, hd, capacity) the keys transposed and v3 (B*H, capacity, hd) the values, with batch and heads
        # merged so that one bmm serves all (row, head) pairs.
        self.by_pos: torch.Tensor | None = None
        self.kt: torch.Tensor | None = None
        self.v3: torch.Tensor | None = None

    def allocate(self, B: int, H: int, hd: int, like: torch.Tensor, kv: torch.Tensor | None = None,
                 cross: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """The buffers for B rows of H heads of hd (dtype and device of `like`); kv: a zeroed (2, B, H, capacity,
        hd) buffer to use instead of a new one; cross: the memory's key and value buffers (B, H, M, hd), filled by
        the caller (the fused prefill, priors/cpu_decode.py, gives both)."""
        # Preallocated instead of torch.cat per step: concatenation would copy the whole cache at every token,
        # O(L^2) memory traffic over one sample. Zeros, not empty: the static decode step reads unwritten
        # positions (masked, with weight 0, and 0 * NaN garbage would still be NaN).
        self.kv = like.new_zeros(2, B, H, self.capacity, hd) if kv is None else kv
        self.positions = torch.arange(self.capacity, device=like.device)
        self.by_pos = self.kv.permute(3, 0, 1, 2, 4)
        self.kt = self.kv[0].view(B * H, self.capacity, hd).transpose(1, 2)
        self.v3 = self.kv[1].view(B * H, self.capacity, hd)
        self.k, self.v = self.kv[0], self.kv[1]
        if cross is not None:
            self.cross_k, self.cross_v = cross

    def append(self, k: torch.Tensor, v: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, H, l, hd) at [offset, offset + l); return all (B, H, offset + l, hd)."""
        B, H, l, hd = k.shape
        if self.kv is None:
            self.allocate(B, H, hd, k)
        elif self.kv.shape[1] != B:
            raise ValueError(f"KVCache holds batch size {self.kv.shape[1]}, got {B}; use a new cache")
        self.kv[0, :, :, offset:offset + l] = k
        self.kv[1, :, :, offset:offset + l] = v
        self.k, self.v = self.kv[0], self.kv[1]  # views taken after the writes (autograd tracks the base's version)
        return self.k[:, :, :offset + l], self.v[:, :, :offset + l]

    def write(self, kv: torch.Tensor, pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Write one position's keys and values kv (2, B, H, hd) into the allocated buffer, one copy for both.

        pos int: one copy into by_pos[pos]; attention then reads the filled part through kt and v3 (None returned).
        pos (1,) tensor: an index_put_ (which torch.compile keeps in place); returns the whole buffers
        (B, H, capacity, hd), for a masked read.
        """
        if self.kv is None:
            raise ValueError("KVCache is empty: fill it with a forward(..., cache=cache) call first")
        if isinstance(pos, int):
            self.by_pos[pos].copy_(kv)
            return None
        self.kv[:, :, :, pos] = kv.unsqueeze(3)
        return self.k, self.v


class KVCache:
    """Per-layer self-attention K/V written step by step, plus per-layer cross-attention K/V computed once.

    `length` is the number of positions the forward calls have filled; the next forward call's
    tokens sit at positions length, length + 1, ... (`Transformer.decode` takes its position
    explicitly and leaves `length` alone).
    """

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerKV(capacity) for _ in range(n_layer)]
        self.length = 0
        # The fused CPU step's state for this cache (priors.cpu_decode.FusedStep), made by the first decode step
        # that takes it; False once a step found that it does not apply.
        self.fused: object | None = None

    def __len__(self) -> int:
        return self.length


def _attention_scale(cfg: TransformerConfig) -> torch.Tensor:
    """1 / sqrt(head dim) as a 0-dim tensor, for the decode steps: multiplying by a Python float makes torch wrap
    and copy it into a tensor at every call (four more operators per layer and step); a 0-dim tensor multiplies
    as is, and to the same bits (the float is rounded to the activations' dtype either way). Not in state_dict."""
    return torch.tensor((cfg.inner_dim // cfg.n_head) ** -0.5)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.causal = cfg.causal
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.inner_dim)
        self.proj = nn.Linear(cfg.inner_dim, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.register_buffer("scale", _attention_scale(cfg), persistent=False)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None, offset: int = 0) -> torch.Tensor:
        B, l, D = x.shape
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.n_head)  # (B, H, l, hd)
        if kv is not None:
            k, v = kv.append(k, v, offset)  # (B, H, offset + l, hd)
        mask, is_causal = None, False
        if self.causal and l > 1:
            if offset == 0:
                is_causal = True  # square score matrix: the built-in lower-triangular mask is right
            else:
                # Several new queries after a cached prefix: query i sits at offset + i and
                # may see keys 0 .. offset + i (tril with a diagonal shift).
                mask = torch.ones(l, offset + l, dtype=torch.bool, device=x.device).tril(diagonal=offset)
        # A single new query (l == 1) may attend to every cached key: they all precede it.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, l, hd)
        return self.resid_drop(self.proj(rearrange(y, "b h l d -> b l (h d)")))  # (B, l, D)

    def decode(self, x: torch.Tensor, kv: LayerKV, pos: int | torch.Tensor) -> torch.Tensor:
        """One new position per row (see Transformer.decode). (B, D) -> (B, D), the projection's output.

        Functional calls on 2-D rows, not the modules nor einops: this step runs once per generated token, where
        every module call, pattern lookup and reshape of a (B, 1, D) activation is overhead of the same order
        as the work."""
        B = x.shape[0]
        D = self.proj.in_features  # the attention's width (d_model unless attn_dim is set)
        H = self.n_head
        hd = D // H
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)  # (B, 3D): one matmul for q, k, v
        # One query's attention written out (two matmuls and a softmax) rather than the fused kernel, whose
        # setup outweighs its work at one query per row.
        # Scaled out of place: the product is a contiguous q, which the matmul would otherwise copy first.
        q = qkv[:, :D] * self.scale  # (B, D)
        if isinstance(pos, int):
            # Eager: bmm on the cache's merged (row, head) views, reading the written prefix 0 .. pos only.
            kv.write(qkv[:, D:].view(B, 2, H, hd).transpose(0, 1), pos)
            n = pos + 1
            scores = torch.bmm(q.view(B * H, 1, hd), kv.kt[:, :, :n])  # (B H, 1, n)
            y = torch.bmm(scores.softmax(-1), kv.v3[:, :n])  # (B H, 1, hd): every key up to pos precedes the query
        else:
            k, v = kv.write(qkv[:, D:].view(B, 2, H, hd).transpose(0, 1), pos)  # (B, H, capacity, hd)
            scores = torch.matmul(q.view(B, H, 1, hd), k.transpose(-1, -2))  # (B, H, 1, capacity)
            # The static form reads the whole buffer: positions after pos (zeros, not yet written) get weight 0.
            scores = scores.masked_fill(kv.positions > pos, float("-inf"))
            y = torch.matmul(scores.softmax(-1), v)  # (B, H, 1, hd)
        return F.linear(y.view(B, D), self.proj.weight, self.proj.bias)  # (B, D): heads are contiguous in y


class CrossAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.inner_dim)
        self.proj = nn.Linear(cfg.inner_dim, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.register_buffer("scale", _attention_scale(cfg), persistent=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, kv: LayerKV | None = None) -> torch.Tensor:
        B, l, D = x.shape
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.n_head)  # (B, H, l, hd)
        if kv is not None and kv.cross_k is not None:
            k, v = kv.cross_k, kv.cross_v  # the memory is fixed while decoding: project it once
        else:
            if memory is None:
                raise ValueError("cross_attn=True needs a memory (B, M, D) on the first call")
            k, v = rearrange(self.kv(memory), "b m (two h d) -> two b h m d", two=2, h=self.n_head)  # (B, H, M, hd)
            if kv is not None:
                # Contiguous once here: the views rearrange returns would make every decode step's
                # matmul copy the whole memory's keys and values again.
                kv.cross_k, kv.cross_v = k.contiguous(), v.contiguous()
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, l, hd)
        return self.resid_drop(self.proj(rearrange(y, "b h l d -> b l (h d)")))  # (B, l, D)

    def decode(self, x: torch.Tensor, kv: LayerKV) -> torch.Tensor:
        """One new position per row against the memory's cached keys/values. (B, D) -> (B, D)

        Written out like SelfAttention.decode: the fused kernel's setup costs more than one query's work."""
        B = x.shape[0]
        D = self.proj.in_features  # the attention's width (d_model unless attn_dim is set)
        H = self.n_head
        hd = D // H
        q = F.linear(x, self.q.weight, self.q.bias).view(B, H, 1, hd).mul_(self.scale)
        scores = torch.matmul(q, kv.cross_k.transpose(-1, -2))  # (B, H, 1, M)
        y = torch.matmul(scores.softmax(-1), kv.cross_v)  # (B, H, 1, hd)
        return F.linear(y.view(B, D), self.proj.weight, self.proj.bias)  # (B, D)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, l, 4D) inside, (B, l, D) out


class Block(nn.Module):
    """Pre-LN: x + SelfAttn(LN(x)); [x + CrossAttn(LN(x), memory)]; x + MLP(LN(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_cross = nn.LayerNorm(cfg.d_model) if cfg.cross_attn else None
        self.cross = CrossAttention(cfg) if cfg.cross_attn else None
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                kv: LayerKV | None = None, offset: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), kv, offset)
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), memory, kv)
        return x + self.mlp(self.ln_mlp(x))

    def decode(self, x: torch.Tensor, kv: LayerKV, pos: int | torch.Tensor) -> torch.Tensor:
        """One new position per row through the cache; the memory's K/V are already in it. (B, D) -> (B, D)

        Each residual branch's output buffer takes the residual in place (add_): no extra allocation per branch."""
        ln = self.ln_attn
        x = self.attn.decode(F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps), kv, pos).add_(x)
        if self.cross is not None:
            ln = self.ln_cross
            x = self.cross.decode(F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps), kv).add_(x)
        ln, mlp = self.ln_mlp, self.mlp
        h = F.gelu(F.linear(F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps), mlp.fc.weight,
                            mlp.fc.bias))  # (B, 4D)
        return F.linear(h, mlp.proj.weight, mlp.proj.bias).add_(x)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_in, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_out, bias=cfg.head_bias) if cfg.vocab_out > 0 else None
        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: scale the residual projections by 1/sqrt(2 n_layer) so the residual
        # stream's variance does not grow with depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer, self.cfg.seq_len)

    def forward(self, idx: torch.Tensor, memory: torch.Tensor | None = None,
                cache: KVCache | None = None, fused: bool = False) -> torch.Tensor:
        """Logits (B, l, vocab_out), or hidden states (B, l, D) when vocab_out == 0.

        With a cache, idx holds only the new positions (usually one); their positions
        start after what the cache holds, and the memory's cross-attention K/V are
        computed on the first call and reused (memory may be None afterwards).
        fused: a pass without a cache may run as the fused CPU pass (priors/cpu_decode.py) where it applies; the
        samplers ask for it (full_logits), the training, likelihood and uncached reference paths do not. A call
        that fills an empty cache takes the fused prefill wherever the fused steps apply.
        """
        B, l = idx.shape
        offset = cache.length if cache is not None else 0
        if offset + l > self.cfg.seq_len:
            raise ValueError(f"sequence of {offset + l} positions exceeds seq_len={self.cfg.seq_len}")
        if self.cfg.cross_attn and memory is None and (cache is None or cache.layers[0].cross_k is None):
            raise ValueError("cross_attn=True needs a memory (B, M, D)")
        if fused and cache is None and memory is None and cpu_decode.applies(self, step=False):
            return cpu_decode.fused_pass(self, idx)
        if (cache is not None and offset == 0 and cache.fused is None and cpu_decode.applies(self)
                and (self.cfg.cross_attn == (memory is not None))
                and (memory is None or memory.shape[0] == B and memory.shape[-1] == self.cfg.d_model)):
            # An empty cache filled for a sampling loop on a CPU: the fused prefill (priors/cpu_decode.py), which
            # also prepares the fused steps that follow. (A memory of another shape takes ATen's path, which says
            # what is wrong with it.)
            return cpu_decode.prefill(self, idx, memory, cache)
        if cache is not None and cache.fused:
            cache.fused.resync(offset)  # the fused step's copy of the cache is stale from here on
        pos = torch.arange(offset, offset + l, device=idx.device)  # (l,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, l, D)
        for i, block in enumerate(self.blocks):
            x = block(x, memory, cache.layers[i] if cache is not None else None, offset)  # (B, l, D)
        x = self.ln_f(x)
        if cache is not None:
            cache.length = offset + l
        return self.head(x) if self.head is not None else x  # (B, l, vocab_out) or (B, l, D)

    def decode(self, idx: torch.Tensor, cache: KVCache, pos: int | torch.Tensor) -> torch.Tensor:
        """The one-token step of a sampling loop: logits (B, 1, vocab_out) of idx (B, 1) at position pos.

        The cache must hold positions 0 .. pos - 1 (a forward(..., cache=cache) prefill, then decode
        steps); the memory's cross-attention K/V come from the prefill. pos is an int (eager: attention
        reads the prefix) or a (1,) int64 tensor on the model's device, e.g. a slice of arange
        (static shapes: attention reads the whole buffer, masked; what torch.compile captures).
        Both forms give the same values up to float rounding. Inference only (no dropout); the
        caller tracks positions (cache.length is not updated).
        """
        if self.training:
            raise RuntimeError("Transformer.decode is for sampling: call it in eval mode")
        p = cache.layers[0].positions
        if p is None:
            raise ValueError("KVCache is empty: fill it with a forward(..., cache=cache) call first")
        if isinstance(pos, int) and not torch.is_grad_enabled():
            # An eager step on a CPU goes through the fused step (priors/cpu_decode.py) where it applies.
            if cache.fused is None:
                cache.fused = cpu_decode.FusedStep(self, cache) if cpu_decode.applies(self) else False
            if cache.fused:
                return cache.fused(idx, pos)[:, None]
        elif cache.fused and isinstance(pos, int):
            cache.fused.resync(pos)  # this step writes the ATen cache only
        W = self.pos_emb.weight  # the row of position pos, added to every token's embedding: x (B, D)
        x = F.embedding(idx[:, 0], self.tok_emb.weight) + (W[pos] if isinstance(pos, int) else W[pos][0])
        for block, kv in zip(self.blocks, cache.layers):
            x = block.decode(x, kv, pos)  # (B, D)
        ln = self.ln_f
        x = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        out = F.linear(x, self.head.weight, self.head.bias) if self.head is not None else x  # (B, V) or (B, D)
        return out[:, None]


# ---- the decoding loop's threads ---------------------------------------------

# Intra-op CPU threads of a cached decoding loop: an int (at most that many), None (the caller's setting) or "auto".
# A decode step is about sixty small kernels on B rows each; how a second thread pays depends on how OpenMP's idle
# threads wait, which OMP_WAIT_POLICY sets before torch loads (bench/run.py and the benchmarks ask for passive):
# - passive: an idle thread sleeps, and every kernel that splits wakes it and waits (tens of microseconds, the
#   size of the kernel itself), so one thread is faster, on a quiet machine and on a busy one;
# - active or OpenMP's default (spin, then sleep): a spinning thread joins within microseconds, and two threads
#   sampled 1.2-1.6x faster than one in most runs on a 2-core machine with nothing else running; on a busy machine
#   a spinning join waits for a descheduled thread and both threads lose (docs/speed.md has the figures).
# "auto" takes one thread under passive waiting and the caller's setting otherwise: asking for spinning is saying
# the cores are the job's own.
DECODE_THREADS: int | None | str = "auto"


def decode_thread_limit() -> int | None:
    """DECODE_THREADS resolved: the most intra-op threads a cached decoding loop runs with (None: no limit)."""
    if DECODE_THREADS != "auto":
        return DECODE_THREADS
    return 1 if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive" else None


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (back as it was after). A decoding loop makes a few
    dozen short-lived objects per token, freed by reference counting; the collections they trigger walk the whole
    heap. (perf put the collector at 7% of a sampling process's samples, start-up included; pausing it made no
    difference above the noise of the timed loops, so it is a guard, not a measured gain.)"""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def decode_threads(device: torch.device) -> Iterator[None]:
    """Run a cached decoding loop: on a CPU with at most decode_thread_limit() intra-op threads (the setting back
    after; other devices, and a caller already at or below it, are left alone), and with the garbage collector
    paused (gc_paused). The fused step's rows are split over the caller's threads all the same
    (priors.cpu_decode.step_threads)."""
    before, limit = torch.get_num_threads(), decode_thread_limit()
    limited = device.type == "cpu" and limit is not None and before > limit
    if limited:
        torch.set_num_threads(limit)
        # The fused step (priors/cpu_decode.py) forks once per token, not once per kernel: it keeps the caller's
        # threads.
        cpu_decode.STEP_THREADS = before
    try:
        with gc_paused():
            yield
    finally:
        if limited:
            torch.set_num_threads(before)
            cpu_decode.STEP_THREADS = None


# ---- compiled steps --------------------------------------------------------

_COMPILED: dict[tuple[Callable, str], Callable] = {}
# torch.compile's backend for the compiled steps. "inductor" generates the fused kernels; tests set "eager"
# (dynamo's graph capture alone: the same graphs and static shapes, no C++ compilation, seconds not minutes).
COMPILE_BACKEND = "inductor"


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), made once per function and shared by every model it is called with.

    The functions compiled here take their modules as arguments, so dynamo guards on shapes, dtypes
    and devices rather than on one model: models of one architecture and batch size share a graph,
    and each new shape costs one more compilation (tens of seconds on a CPU), paid by the first call.
    Static shapes (dynamic=False): the decode steps use the tensor-position form, so one graph
    serves every position; fullgraph=True makes a graph break an error instead of a silent slowdown.
    """
    key = (fn, COMPILE_BACKEND)
    if key not in _COMPILED:
        # One graph per architecture x batch size: ImageBART T=9 alone has 8 decoders, dynamo's default
        # limit of graphs per function, after which it would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[key] = torch.compile(fn, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
    return _COMPILED[key]


def decode_logits(model: Transformer, idx: torch.Tensor, cache: KVCache, pos: int | torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) of one decode step (the AR sampler's network call; compiled as a whole)."""
    return model.decode(idx, cache, pos)[:, -1]  # (B, V)


def full_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """model(idx) without a cache (B, L, V), or (B, L, D) without a head: the absorbing sampler's network call
    (compiled as a whole) and ImageBART's encoder pass. Eager on a CPU, outside autograd: the fused pass
    (priors/cpu_decode.py), the same up to float rounding."""
    return model(idx, fused=True)


# ---- parameter budget ------------------------------------------------------

def count_params(cfg: object, module: Callable[..., nn.Module] = Transformer) -> int:
    """Trainable parameters of module(cfg) (a Transformer, or a prior's own module such as ImageBART's
    ScaleModel), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return sum(p.numel() for p in module(cfg).parameters() if p.requires_grad)


BUDGET_TOLERANCE = 0.1  # a prior's parameter count may miss budget.params by at most this fraction


def fit_d_model(budget: float, count: Callable[[int], int], n_head: int, min_d: int = 16,
                what: str = "this model", check: bool = True) -> int:
    """The width d (a multiple of n_head, >= min_d) whose parameter count count(d) is closest to budget.

    count(d) grows monotonically with d (quadratically), so a doubling search then a
    bisection over multiples of n_head needs only O(log d) evaluations of count.
    Raises ValueError when even the closest width is more than BUDGET_TOLERANCE off the budget
    (in practice: a budget too small for the fixed depth, embeddings and head). check=False
    returns the closest width to any target however far off (ImageBART balances its scales with it).
    """
    if check and budget <= 0:
        raise ValueError(f"budget.params={budget} must be positive")
    cache: dict[int, int] = {}

    def n(k: int) -> int:  # parameter count at width k * n_head
        if k not in cache:
            cache[k] = int(count(k * n_head))
        return cache[k]

    k_lo = max(1, -(-min_d // n_head))  # smallest allowed multiple
    if n(k_lo) >= budget:
        k_best = k_lo
    else:
        lo, hi = k_lo, 2 * k_lo  # invariant: n(lo) < budget
        while n(hi) < budget:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:  # smallest k with n(k) >= budget lies in (lo, hi]
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if n(mid) < budget else (lo, mid)
        k_best = min((lo, hi), key=lambda k: abs(n(k) - budget))
    d, got = k_best * n_head, n(k_best)
    if check and abs(got - budget) > BUDGET_TOLERANCE * budget:
        raise ValueError(f"budget.params={budget} is too small for {what}: the closest width d_model={d} "
                         f"has {got} parameters ({(got - budget) / budget:+.0%}; at most {BUDGET_TOLERANCE:.0%} allowed)")
    return d


# ---- sampling from logits -----------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (smallest set with mass >= top_p)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens ranked above it already reach top_p: what remains
        # is the smallest prefix of the ranking whose mass is >= top_p (the top token always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,) int64; temperature, then top-k, then top-p.

    The draw is torch.multinomial(probs, 1)'s own algorithm, written out: argmax(probs / q) with q ~ Exp(1) drawn
    from the same generator (the exponential race, i.e. the Gumbel-max trick), so the tokens and the generator's
    state are those of multinomial. multinomial first checks the probabilities (min, max, row sums: ten more
    operations per call, a quarter of a cached decode step's operations at the default shapes); softmax of
    logits that are finite or -inf cannot fail them. On a CPU, q comes from `exponential_draws`.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax/cumsum of a bf16 head output would distort the tail
    if temperature != 1.0:  # x / 1.0 is x exactly: skipping it changes no bit
        logits = logits / temperature
    return draw_categorical(filter_logits(logits, top_k, top_p).softmax(dim=-1), generator)  # (B,)


def draw_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (N, V) -> (N,): torch.multinomial(probs, 1)[:, 0]'s tokens and generator state,
    drawn as multinomial does (argmax(probs / q), q ~ Exp(1): the exponential race) without its checks."""
    return torch.argmax(probs / exponential_draws(probs, generator), dim=-1)


def exponential_draws(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) draws shaped like `like`: the values and generator state of `torch.empty_like(like).exponential_()`.

    On a CPU, exponential_ draws one element at a time (a 64-bit random number, its top 53 bits as a double u,
    then -log1p(-u) in double precision, rounded to the tensor's dtype): about 19 ns per element, 7% of a cached
    decode step at the default shapes. Here the same u come from one uniform_ call on a float64 tensor (the same
    53-bit mapping of the same 64-bit numbers, so the generator ends in the same state) and -log1p(-u) is
    vectorized: 2.6x faster with AVX-512. Its log1p and the C library's both round to within one unit in the last
    place of a double, so they can differ there; the float32 rounding of q hides that unless the exact value lies
    within that unit of a float32 rounding boundary, about 2^-29 of draws (tests compare millions of draws under
    every CPU kernel). Other devices (their generators map random numbers differently) and dtypes other than
    float32 (float64 would keep the double whose last place the two logarithms may round apart) call exponential_.
    """
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return torch.empty_like(like).exponential_(1.0, generator=generator)
    u = torch.empty(like.shape, dtype=torch.float64).uniform_(generator=generator)
    return u.neg_().log1p_().neg_().to(like.dtype)  # in place: one float64 buffer


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject sampling settings that would silently do something else."""
    if not temperature > 0:
        raise ValueError(f"prior.sample.temperature={temperature} must be > 0")
    if not math.isfinite(temperature):  # inf flattens every softmax to uniform noise
        raise ValueError(f"prior.sample.temperature={temperature} must be finite")
    if top_k is not None and top_k < 1:
        raise ValueError(f"prior.sample.top_k={top_k} must be >= 1 or null")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"prior.sample.top_p={top_p} must be in (0, 1] or null")
