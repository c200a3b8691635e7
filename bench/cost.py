"""What a job will cost, from its configuration alone: FLOPs, cache disk and hours on named devices.

Counted with the model-FLOP convention of priors/flops.py (2 FLOPs per weight per token, attention over the
(query, key) pairs a pass reads; embeddings, norms and softmaxes count 0):

    training     3 x the forward FLOPs of every transformer of every unit (forward, and a backward of twice the
                 forward: the gradients of the activations and of the weights) x batch x steps, plus the
                 validation forwards (val_batches x batch every val_every steps)
    sampling     the prior's own sample_flops per image (the path it samples with) x (samples + completions);
                 completions generate part of a grid, so counting whole images bounds them from above
    Inception    one forward per image it sees (reference, samples, completions, the two baseline rows), its
                 FLOPs counted by torch's FlopCounterMode on one 299 x 299 forward
    tokenizer    training a VQGAN here: 3 x its encoder and decoder forward x batch x steps (the discriminator
                 and LPIPS excluded); encoding every train and val image (the tokens stage), decoding the val
                 reconstructions, samples and completions; encoder and decoder FLOPs counted by FlopCounterMode
                 on the meta device (shapes only, nothing computed)
    disk         token cache (int64), reference features (float32), the prior's checkpoints (weights, EMA, best
                 copy and AdamW's two moments: 5 float32 copies of the parameters) and the samples file

Hours divide FLOPs by a device's peak times a stated utilisation per phase (UTILISATION: what a well-fed
training step, a memory-bound decode and a convolution network reach). Peaks: the vendors' dense bf16 figures
for GPUs, and for the CPU the float32 matmul peak measured on this machine (priors.flops.matmul_peak_flops).
Estimates, not promises; the report puts the measured times beside them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench import keys as K
from priors.flops import call_flops, causal_pairs, sample_flops_per_image
from priors.transformer import Transformer

FLOAT = 4
GPU_PEAKS = {  # dense bf16 tensor-core FLOP/s, the vendors' data sheets
    "A100": 312e12,
    "H100 SXM": 989e12,
}
UTILISATION = {"training": 0.40, "sampling": 0.10, "inception": 0.30}
CHECKPOINT_COPIES = 5  # weights, EMA, best copy, AdamW's two moments


@dataclass
class Cost:
    """One job's estimate (or a sweep's total); hours per device from the FLOPs and the devices' peaks."""
    params: int
    train_flops: float
    sample_flops: float
    inception_images: int
    inception_flops: float
    tokenizer_flops: float  # training the VQGAN here (0 for a released one) and encoding the images
    decode_flops: float  # decoding reconstructions, samples and completions
    disk_bytes: int
    peaks: dict[str, float]  # device name -> peak FLOP/s

    @property
    def hours(self) -> dict[str, float]:
        work = ((self.train_flops + self.tokenizer_flops) / UTILISATION["training"]
                + self.sample_flops / UTILISATION["sampling"]
                + (self.inception_flops + self.decode_flops) / UTILISATION["inception"])
        return {name: work / peak / 3600 for name, peak in self.peaks.items()}

    def as_results(self) -> dict[str, Any]:
        """The plan_* keys of results.json (bench/results.py); params has its own key."""
        out = asdict(self)
        out.pop("params")
        out.pop("peaks")
        return {f"plan_{k}": v for k, v in out.items()} | {K.PLAN_HOURS: self.hours}

    def lines(self) -> list[str]:
        hours = ", ".join(f"{name} {format_hours(h)}" for name, h in self.hours.items())
        return [
            f"cost: {self.params:,} parameters; training {self.train_flops:.3g} FLOPs, sampling "
            f"{self.sample_flops:.3g} FLOPs, Inception {self.inception_images:,} images ({self.inception_flops:.3g} "
            f"FLOPs), tokenizer {self.tokenizer_flops + self.decode_flops:.3g} FLOPs; cache disk "
            f"{format_bytes(self.disk_bytes)}",
            f"cost: estimated time {hours} (utilisation: training {UTILISATION['training']:.0%}, sampling "
            f"{UTILISATION['sampling']:.0%}, Inception {UTILISATION['inception']:.0%} of peak)",
        ]


def format_hours(h: float) -> str:
    if h < 1 / 3600:
        return "<1 s"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def forward_flops(t: Transformer) -> int:
    """Model FLOPs of one forward of a whole sequence through Transformer t (priors/flops.py's convention); a
    cross-attending decoder reads an encoder memory of its own length, projected once."""
    c = t.cfg
    pairs = causal_pairs(0, c.seq_len) if c.causal else c.seq_len * c.seq_len
    memory = c.seq_len if c.cross_attn else 0
    return call_flops(c, c.seq_len, pairs, memory, project_memory=c.cross_attn)


def unit_forward_flops(prior: Any) -> dict[str, int]:
    """Forward FLOPs of one sequence per unit: the sum over the shared transformers the unit runs."""
    return {name: sum(forward_flops(m) for m in unit.modules() if isinstance(m, Transformer))
            for name, unit in prior.units().items()}


def training_flops(prior: Any, batch_size: int, steps: int, val_every: int, val_batches: int) -> float:
    """Every unit's training steps (3 x forward) and validation forwards."""
    per_seq = sum(unit_forward_flops(prior).values())
    validations = steps // max(val_every, 1) + 1
    return float(per_seq * batch_size * (3 * steps + val_batches * validations))


_INCEPTION_FLOPS: dict[str, float] = {}


def inception_flops_per_image(extractor: Any) -> float:
    """FLOPs of one 299 x 299 forward of the extractor's network (torch's FlopCounterMode, once per network)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.features import INCEPTION_SIZE
    key = extractor.name
    if key not in _INCEPTION_FLOPS:
        image = torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            extractor(image)
        _INCEPTION_FLOPS[key] = float(counter.get_total_flops())
    return _INCEPTION_FLOPS[key]


def disk_bytes(prior: Any, params: int, n_images: int, n_reference: int, n_samples: int, n_completions: int,
               resolution: int, logits: bool) -> int:
    tokens = n_images * prior.seq_len * 8
    features = n_reference * (2048 + (1008 if logits else 0)) * FLOAT
    checkpoints = params * FLOAT * CHECKPOINT_COPIES
    samples = (n_samples + n_completions) * (3 * resolution * resolution + prior.seq_len * 8)
    return int(tokens + features + checkpoints + samples)


def estimate(prior: Any, params: int, cfg: Any, counts: dict[str, int], resolution: int,
             inception_per_image: float, own_peak: tuple[str, float] | None, train: bool = True,
             codec: tuple[float, float] = (0.0, 0.0), tokenizer_training: tuple[int, int] | None = None) -> Cost:
    """The job's cost. counts: n_train, n_val, n_reference, n_completions (after clipping to the val split), and
    n_encoded (images the tokens stage encodes); own_peak: the job's own device (its name and measured peak),
    beside the named GPUs. train=False: a released prior, nothing to train. codec: the tokenizer's (encoder,
    decoder) FLOPs per image; tokenizer_training: (steps, batch) when the tokenizer is trained here."""
    t, e = cfg.train, cfg.eval
    train_flops = training_flops(prior, int(t.batch_size), int(t.steps), int(t.val_every),
                                 int(t.val_batches)) if train else 0.0
    n_samples = int(e.num_samples)
    per_image = sample_flops_per_image(prior) or 0.0
    sample_flops = per_image * (n_samples + counts[K.N_COMPLETIONS])
    # Reference, samples, completions, and the two baseline rows (real val images, reconstructions) at N.
    images = counts[K.N_REFERENCE] + n_samples + counts[K.N_COMPLETIONS] + 2 * min(n_samples, counts[K.N_VAL])
    inception_flops = images * inception_per_image
    encode, decode = codec
    vq_train = 3 * (encode + decode) * tokenizer_training[0] * tokenizer_training[1] if tokenizer_training else 0.0
    vq_encode = encode * counts.get("n_encoded", counts["n_train"] + counts[K.N_VAL])
    vq_decode = decode * (counts[K.N_VAL] + n_samples + counts[K.N_COMPLETIONS])
    peaks = dict(GPU_PEAKS)
    if own_peak:
        peaks[own_peak[0]] = own_peak[1]
    disk = disk_bytes(prior, params, counts["n_train"] + counts[K.N_VAL], counts[K.N_REFERENCE], n_samples,
                      counts[K.N_COMPLETIONS], resolution, logits=False)
    return Cost(params, train_flops, sample_flops, images, inception_flops, vq_train + vq_encode, vq_decode, disk,
                peaks)


def total(costs: list[Cost], keys: list[dict[str, str]] | None = None) -> Cost:
    """A sweep's total over its jobs' estimates. keys: per job, the cache keys of its "tokens", "train" and
    "eval" stages; each phase is then counted once per key, as the sweep computes it once (AR's points at other
    T reuse one training and one evaluation, absorbing's trains once for every T)."""
    keys = keys or [{"tokens": str(i), "train": str(i), "eval": str(i)} for i in range(len(costs))]
    seen: dict[str, set[str]] = {"tokens": set(), "train": set(), "eval": set()}
    sums = dict.fromkeys(("params", "train", "sample", "images", "inception", "tokenizer", "decode", "disk"), 0.0)
    for c, k in zip(costs, keys):
        if k["tokens"] not in seen["tokens"]:
            seen["tokens"].add(k["tokens"])
            sums["tokenizer"] += c.tokenizer_flops
        if k["train"] not in seen["train"]:
            seen["train"].add(k["train"])
            sums["params"] += c.params
            sums["train"] += c.train_flops
        if k["eval"] not in seen["eval"]:
            seen["eval"].add(k["eval"])
            sums["sample"] += c.sample_flops
            sums["images"] += c.inception_images
            sums["inception"] += c.inception_flops
            sums["decode"] += c.decode_flops
            sums["disk"] += c.disk_bytes
    return Cost(int(sums["params"]), sums["train"], sums["sample"], int(sums["images"]), sums["inception"],
                sums["tokenizer"], sums["decode"], int(sums["disk"]), dict(costs[0].peaks) if costs else {})
