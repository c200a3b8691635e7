"""minGPT, as the released priors use it, onto priors/transformer.py.

Taming Transformers, ImageBART and Unleashing Transformers all build their transformers from Karpathy's minGPT.
It and priors/transformer.py compute the same function: pre-LayerNorm blocks, exact GELU, a 4x MLP, scaled
dot-product attention, learned positions, a bias-free head. Only the layout differs: separate query/key/value
projections (the project's qkv stacks them in that order), `ln1`/`ln2` (ln_attn/ln_mlp), `mlp.0`/`mlp.2`
(mlp.fc/mlp.proj), positions as one (1, block_size, D) parameter (an Embedding of its first rows), and in causal
models a (1, 1, block_size, block_size) mask buffer (the project masks without one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

RENAMES = {"ln1": "ln_attn", "ln2": "ln_mlp", "attn.proj": "attn.proj", "mlp.0": "mlp.fc", "mlp.2": "mlp.proj"}


@dataclass(frozen=True)
class GPTShape:
    """A minGPT's sizes: vocab_size is its input embedding's rows, head_size its output logits."""
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    head_size: int | None = None  # None: vocab_size

    @property
    def n_out(self) -> int:
        return self.vocab_size if self.head_size is None else self.head_size


def gpt_keys(shape: GPTShape, prefix: str, causal: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a minGPT state dict under `prefix`, in its module order."""
    V, B, D = shape.vocab_size, shape.block_size, shape.n_embd
    keys: dict[str, tuple[int, ...]] = {f"{prefix}pos_emb": (1, B, D), f"{prefix}tok_emb.weight": (V, D)}
    for i in range(shape.n_layer):
        p = f"{prefix}blocks.{i}."
        keys.update({p + "ln1.weight": (D,), p + "ln1.bias": (D,), p + "ln2.weight": (D,), p + "ln2.bias": (D,)})
        if causal:
            keys[p + "attn.mask"] = (1, 1, B, B)
        for name in ("key", "query", "value", "proj"):
            keys.update({f"{p}attn.{name}.weight": (D, D), f"{p}attn.{name}.bias": (D,)})
        keys.update({p + "mlp.0.weight": (4 * D, D), p + "mlp.0.bias": (4 * D,),
                     p + "mlp.2.weight": (D, 4 * D), p + "mlp.2.bias": (D,)})
    keys.update({f"{prefix}ln_f.weight": (D,), f"{prefix}ln_f.bias": (D,), f"{prefix}head.weight": (shape.n_out, D)})
    return keys


def project_state_dict(sd: dict[str, torch.Tensor], shape: GPTShape, seq_len: int,
                       prefix: str) -> dict[str, torch.Tensor]:
    """The minGPT weights under `prefix` of sd, under priors/transformer.py's names (its first seq_len positions)."""
    out = {"tok_emb.weight": sd[f"{prefix}tok_emb.weight"], "pos_emb.weight": sd[f"{prefix}pos_emb"][0, :seq_len],
           "ln_f.weight": sd[f"{prefix}ln_f.weight"], "ln_f.bias": sd[f"{prefix}ln_f.bias"],
           "head.weight": sd[f"{prefix}head.weight"]}
    for i in range(shape.n_layer):
        src, dst = f"{prefix}blocks.{i}.", f"blocks.{i}."
        for old, new in RENAMES.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = sd[f"{src}{old}.{kind}"]
        for kind in ("weight", "bias"):  # the project's qkv projects to (q, k, v) stacked in that order
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([sd[f"{src}attn.{n}.{kind}"] for n in ("query", "key", "value")])
    return out
