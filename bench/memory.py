"""What a job's peak memory will at least be, from the configured shapes alone (before any work).

Each figure counts the large tensors a phase keeps alive, per transformer of a unit (the one shared
`Transformer` module: the harness reads its config, never a prior's name), in float32, or at 2 bytes under bf16
autocast (precision=bf16: matmul outputs and the KV cache are bf16 there; the residual stream, LayerNorm and
softmax outputs stay float32, so the true figure is larger):

    training    activations kept for the backward pass: per token and block the residual stream, the q/k/v,
                attention output and MLP tensors (16 D; attention scores are not counted, fused kernels do not
                keep them), plus the logits and their log-softmax (2 V: the logits' gradient, a third, comes
                after the previous step's gradients are freed)
    sampling    per row, a causal transformer's KV cache (2 D per block and position, twice with
                cross-attention: the memory's keys and values) and one step's logits with their softmax; a
                bidirectional one runs whole sequences: per token its logits and their softmax, or the memory
                it hands a decoder. On a CPU in float32, also the fused code's own copy of the keys and values
                and its scratch rows (priors.cpu_decode.floats_per_row), and its packed copy of every sampled
                model's weights (priors.cpu_decode.packed_floats)
    evaluation  the largest of the Inception activations of one feature forward, those of one forward of each
                extractor of eval.fd_features that will run (bench.cost.fd_unavailable; they run one after
                another on the same images, so the largest counts), and the N x N float64 matrices of KID and PRDC
                alive together (three of them, N = min(eval.num_samples, eval.prdc_samples)): features are
                extracted while sampling, the metrics computed after. An FD extractor's activations: the largest
                input and output of one of its layers, alive together while the layer runs (fd_floats_per_image)

The weights' own share comes from the parameter count: every unit's float32 weights, and for the units training
at once their gradients, AdamW's two moments, the EMA and best copies. The figures are lower bounds (checked
against measured allocations in tests/test_memory.py): a job they refuse cannot fit, a job they pass may still
need more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from priors import Prior, cpu_decode
from priors.transformer import Transformer

FLOAT = 4  # bytes: weights, optimizer state and features are float32 (bf16 autocast keeps float32 weights)
BF16 = 2  # bytes: what training and sampling activations are counted at under bf16 autocast
MATRIX = 8  # bytes: the KID kernel and PRDC distance matrices are float64 (bench/stats.py)
# Bytes per trainable parameter of a unit while it trains: fp32 weights, gradients, AdamW's two moments, the EMA
# copy and the best-checkpoint copy.
TRAIN_BYTES_PER_PARAM = FLOAT * 6
# Images per Inception forward on a CPU (bench.features.CPU_CHUNK: a feature batch is cut into forwards of this
# many images there); other devices run whole feature batches.
CPU_FEATURE_CHUNK = 8
# Inception-v3 at 299 x 299 in inference: its stem's second and third convolutions' outputs (32 and 64 channels
# at 147 x 147) are alive together, the largest pair of adjacent activations.
INCEPTION_FLOATS_PER_IMAGE = (32 + 64) * 147 * 147


def leaf_pair_floats(net: torch.nn.Module, size: int, device: str = "meta") -> int:
    """Floats per image of the largest input and output of one leaf module in a forward of one size x size image
    (an in-place layer's output is its input, counted once): both are alive while that layer runs. On the meta
    device nothing is computed or stored."""
    pairs = [0]

    def hook(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        ins = [t for t in inputs if isinstance(t, torch.Tensor)]
        outs = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, torch.Tensor)]
        pairs.append(sum(t.numel() for t in ins) + sum(t.numel() for t in outs if not any(t is i for i in ins)))

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    return max(pairs)


def vit_pair_floats(image: int, patch: int, width: int, ffn: str = "mlp") -> int:
    """leaf_pair_floats of a ViT with a class token, by arithmetic: the patch convolution's input and output, or
    per token the FFN's widest pair: the MLP's activation (4 x width in and out), or SwiGLU's first projection
    (width in, twice its hidden width out)."""
    from bench.cost import swiglu_hidden

    patches = (image // patch) ** 2
    per_token = width + 2 * swiglu_hidden(width) if ffn == "swiglu" else 2 * 4 * width
    return max(3 * image * image + patches * width, (patches + 1) * per_token)


_FD_FLOATS: dict[str, int] = {}


def fd_floats_per_image(name: str) -> int:
    """The activations (floats per image) one forward of extractor `name` at least holds: CLIP's by
    leaf_pair_floats on torch-fidelity's network on the meta device, DINOv2's (whose code comes through
    torch.hub) by vit_pair_floats."""
    from bench import cost as C

    if name in C.DINOV2_ARCH:
        width, _, ffn = C.DINOV2_ARCH[name]
        return vit_pair_floats(C.DINOV2_SIZE, C.DINOV2_PATCH, width, ffn)
    if name not in _FD_FLOATS:
        _FD_FLOATS[name] = leaf_pair_floats(C.clip_visual(name), C.fd_input_size(name))
    return _FD_FLOATS[name]


def feature_floats_per_image(eval_cfg: Any) -> int:
    """The largest one-forward activations per image among Inception and the FD extractors that will run."""
    from bench import cost as C

    fd = [fd_floats_per_image(n) for n, value in C.fd_selection(eval_cfg) if C.fd_unavailable(n, value) is None]
    return max([INCEPTION_FLOATS_PER_IMAGE, *fd])


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


def unit_params(prior: Prior) -> list[int]:
    """Trainable parameters of each unit."""
    return [sum(p.numel() for p in unit.parameters() if p.requires_grad) for unit in prior.units().values()]


def training_floats_per_token(t: Transformer) -> int:
    c = t.cfg
    per_block = 16 * c.d_model + (6 * c.d_model if c.cross_attn else 0)
    return c.n_layer * per_block + 2 * max(c.vocab_out, 0) + 2 * c.d_model


def sampling_floats_per_row(t: Transformer, fused: cpu_decode.Layout | None = None) -> int:
    """fused: the layout of the fused CPU code that will sample (priors/cpu_decode.py), whose own buffers add to
    the figure; None where it will not run."""
    c = t.cfg
    extra = 0 if fused is None else cpu_decode.floats_per_row(c, fused)
    if c.causal:  # decoded position by position through a KV cache of seq_len positions (and the memory's)
        cache = c.n_layer * 2 * c.inner_dim * c.seq_len * (2 if c.cross_attn else 1)
        return cache + 2 * max(c.vocab_out, 0) + extra
    return c.seq_len * (2 * c.vocab_out if c.vocab_out > 0 else c.d_model) + extra


def fused_layout(device_type: str, precision: str) -> cpu_decode.Layout | None:
    """The fused CPU code's layout where it will sample (a CPU, float32, the code built), else None."""
    if device_type != "cpu" or precision != "fp32" or cpu_decode.FUSED_DECODE is False:
        return None
    return cpu_decode.layout()


def evaluation_parts(eval_cfg: Any, device_type: str = "cpu") -> tuple[int, int]:
    """(bytes of the activations of one feature forward: Inception's or the largest FD extractor's, bytes of the
    KID and PRDC matrices alive together)."""
    rows = int(eval_cfg.feature_batch_size)
    if device_type == "cpu":
        rows = min(rows, CPU_FEATURE_CHUNK)
    matrix = min(int(eval_cfg.num_samples), int(eval_cfg.prdc_samples))
    return FLOAT * rows * feature_floats_per_image(eval_cfg), MATRIX * 3 * matrix * matrix


def estimate(prior: Prior, params: int, train_cfg: Any, eval_cfg: Any, unit_workers: int = 1,
             train: bool = True, device_type: str = "cpu", precision: str = "fp32") -> Peak:
    """The least memory of the job's phases; units training at once (unit_workers) add up. train=False: a
    released prior, evaluated only (its weights alone, no training phase). device_type: where features are
    extracted (a CPU runs a feature batch in forwards of CPU_FEATURE_CHUNK images). precision: the job's compute
    precision (bench.device.resolve_precision), which sets the bytes of training and sampling activations."""
    act = BF16 if precision == "bf16" else FLOAT
    batch = int(train_cfg.batch_size)
    units = transformers(prior)
    workers = max(1, unit_workers)
    per_unit = [sum(batch * t.cfg.seq_len * training_floats_per_token(t) for t in ts) for ts in units]
    training = act * sum(sorted(per_unit, reverse=True)[:workers])
    rows = min(int(eval_cfg.batch_size), int(eval_cfg.num_samples))
    fused = fused_layout(device_type, precision)
    sampling = act * max(sum(rows * sampling_floats_per_row(t, fused) for t in ts) for ts in units)
    if fused is not None:  # the fused code's packed copy of each sampled model's weights, kept once made
        sampling += FLOAT * sum(cpu_decode.packed_floats(t.cfg, fused) for ts in units for t in ts)
    evaluation = max(evaluation_parts(eval_cfg, device_type))
    if not train:
        return Peak(params * FLOAT, 0, sampling, evaluation)
    # Units train one after another (or unit_workers at once): the others hold their weights alone.
    training_params = sum(sorted(unit_params(prior), reverse=True)[:workers])
    return Peak(params * FLOAT + training_params * (TRAIN_BYTES_PER_PARAM - FLOAT), training, sampling,
                evaluation)


def check_fits(peak: Peak, params: int, have: int | None, where: str, cfg: Any) -> str | None:
    """One line naming the option to change when the job cannot fit in `have` bytes, else None. `where`: the
    device type."""
    if have is None:
        return None
    features, matrices = evaluation_parts(cfg.eval, where)
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
        "evaluation": (f"eval.feature_batch_size={cfg.eval.feature_batch_size}" if features > matrices else
                       f"eval.prdc_samples={cfg.eval.prdc_samples}",
                       "feature extractors' activations (Inception, eval.fd_features) and the PRDC/KID matrices"),
    }[phase]
    return (f"{option}: {phase} needs at least {need / gib:.1f} GiB ({detail}), more than the "
            f"{have / gib:.1f} GiB {where} memory available")
