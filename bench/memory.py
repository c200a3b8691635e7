"""What a job's peak memory will at least be, from the configured shapes alone (before any work).

Each figure counts the large tensors a phase keeps alive, in float32, per transformer of a unit (the one
shared `Transformer` module: the harness reads its config, never a prior's name):

    training    activations kept for the backward pass: per token and block the residual stream, the q/k/v,
                attention output and MLP tensors (16 D; attention scores are not counted, fused kernels do not
                keep them), plus the logits with their softmax and gradient (3 V)
    sampling    the KV cache (2 D per block and token) and one step's hidden states and logits, per row
    evaluation  Inception activations per feature batch, and the N x N distance and kernel matrices of
                PRDC and KID (three of them, N = min(eval.num_samples, eval.prdc_samples))

The weights' own share (weights, gradients, AdamW's two moments, EMA and best copies) comes from the parameter
count. The figures are lower bounds: a job they refuse cannot fit, a job they pass may still need more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from priors import Prior
from priors.transformer import Transformer

FLOAT = 4  # bytes: activations and features are float32 (bf16 autocast keeps float32 master tensors)
# Bytes per trainable parameter while training: fp32 weights, gradients, AdamW's two moments, the EMA copy and
# the best-checkpoint copy.
TRAIN_BYTES_PER_PARAM = FLOAT * 6
# Inception-v3 at 299 x 299 in inference: its stem's second and third convolutions' outputs (32 and 64 channels
# at 147 x 147) are alive together, the largest pair of adjacent activations.
INCEPTION_FLOATS_PER_IMAGE = (32 + 64) * 147 * 147


@dataclass
class Peak:
    """The least memory each phase needs (bytes), and the option that scales it."""
    weights: int  # parameters with optimizer state, EMA and best copies
    training: int  # activations of one training step
    sampling: int  # KV cache and logits of one sampling batch
    evaluation: int  # feature batches and PRDC/KID matrices

    def worst(self) -> tuple[str, int]:
        phases = {"training": self.weights + self.training, "sampling": self.sampling,
                  "evaluation": self.evaluation}
        phase = max(phases, key=phases.get)
        return phase, phases[phase]


def transformers(prior: Prior) -> list[list[Transformer]]:
    """Per unit, the shared transformer modules it runs (an encoder and a decoder, or one)."""
    return [[m for m in unit.modules() if isinstance(m, Transformer)] for unit in prior.units().values()]


def training_floats_per_token(t: Transformer) -> int:
    c = t.cfg
    per_block = 16 * c.d_model + (6 * c.d_model if c.cross_attn else 0)
    return c.n_layer * per_block + 3 * max(c.vocab_out, 0) + 2 * c.d_model


def sampling_floats_per_token(t: Transformer) -> int:
    c = t.cfg
    return c.n_layer * 2 * c.d_model + max(c.vocab_out, 0) + 16 * c.d_model


def estimate(prior: Prior, params: int, train_cfg: Any, eval_cfg: Any, unit_workers: int = 1,
             train: bool = True) -> Peak:
    """The least memory of the job's phases; units training at once (unit_workers) add up. train=False: a
    released prior, evaluated only (its weights alone, no training phase)."""
    batch = int(train_cfg.batch_size)
    units = transformers(prior)
    per_unit = [sum(batch * t.cfg.seq_len * training_floats_per_token(t) for t in ts) for ts in units]
    training = FLOAT * sum(sorted(per_unit, reverse=True)[:max(1, unit_workers)])
    n = int(eval_cfg.num_samples)
    rows = min(int(eval_cfg.batch_size), n)
    sampling = FLOAT * max(sum(rows * t.cfg.seq_len * sampling_floats_per_token(t) for t in ts) for ts in units)
    feature_rows = int(eval_cfg.feature_batch_size)
    matrix = min(n, int(eval_cfg.prdc_samples))
    evaluation = FLOAT * (feature_rows * INCEPTION_FLOATS_PER_IMAGE + 3 * matrix * matrix)
    if not train:
        return Peak(params * FLOAT, 0, sampling, evaluation)
    return Peak(params * TRAIN_BYTES_PER_PARAM, training, sampling, evaluation)


def check_fits(peak: Peak, params: int, have: int | None, where: str, cfg: Any) -> str | None:
    """One line naming the option to change when the job cannot fit in `have` bytes, else None."""
    if have is None:
        return None
    gib = 2 ** 30
    if peak.weights > have:
        return (f"budget.params={cfg.budget.params}: training {params:,} parameters needs at least "
                f"{peak.weights / gib:.1f} GiB (weights, gradients, AdamW state, EMA), more than the "
                f"{have / gib:.1f} GiB {where} memory available")
    phase, need = peak.worst()
    if need <= have:
        return None
    option, detail = {
        "training": (f"train.batch_size={cfg.train.batch_size}",
                     f"{peak.weights / gib:.1f} GiB weights and optimizer state, {peak.training / gib:.1f} GiB "
                     "activations"),
        "sampling": (f"eval.batch_size={cfg.eval.batch_size}", "KV cache and logits of one sampling batch"),
        "evaluation": (f"eval.prdc_samples={cfg.eval.prdc_samples}" if 3 * min(int(cfg.eval.num_samples),
                       int(cfg.eval.prdc_samples)) ** 2 * FLOAT > int(cfg.eval.feature_batch_size)
                       * INCEPTION_FLOATS_PER_IMAGE * FLOAT else
                       f"eval.feature_batch_size={cfg.eval.feature_batch_size}",
                       "Inception features and the PRDC/KID matrices"),
    }[phase]
    return (f"{option}: {phase} needs at least {need / gib:.1f} GiB ({detail}), more than the "
            f"{have / gib:.1f} GiB {where} memory available")
