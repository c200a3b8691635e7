"""What a job will cost, from its configuration alone: FLOPs, cache disk and hours on named devices.

Counted with the model-FLOP convention of priors/flops.py (2 FLOPs per weight per token, attention over the
(query, key) pairs a pass reads; embeddings, norms and softmaxes count 0):

    training     3 x the forward FLOPs of every transformer of every unit (forward, and a backward of twice the
                 forward: the gradients of the activations and of the weights) x batch x steps, plus the
                 validation forwards (val_batches x batch every val_every steps)
    sampling     the prior's own sample_flops per image (the path it samples with) x (samples + completions);
                 completions generate part of a grid, so counting whole images bounds them from above
    Inception    one forward per image it sees (reference, samples, completions, and the two baseline rows: their
                 val images at the samples' N where the val split has that many, and their completion rows), its
                 FLOPs counted by torch's FlopCounterMode on one 299 x 299 forward
    FD           per extractor of eval.fd_features (bench/evaluate.py's fd): one forward per image it sees (the
                 reference rows, the samples, and the two baseline rows' val images at the samples' N; not the
                 completions), at Inception's utilisation; CLIP's FLOPs counted by FlopCounterMode on torch-
                 fidelity's own network built on the meta device (shapes only, no weights), DINOv2's (whose code
                 comes through torch.hub) from its ViT architecture (vit_flops); an extractor that will be n/a
                 (no weights at hand, none asked for) costs nothing
    tokenizer    training a VQGAN here: 3 x its encoder and decoder forward x batch x steps (the discriminator
                 and LPIPS excluded); encoding every train and val image (the tokens stage), decoding the val
                 reconstructions, samples and completions; encoder and decoder FLOPs counted by FlopCounterMode
                 on the meta device (shapes only, nothing computed)
    disk         token cache (int64), reference features (float32; each FD extractor's too), the prior's
                 checkpoints (weights, EMA, best copy and AdamW's two moments: 5 float32 copies of the parameters)
                 and the samples file

Hours divide FLOPs by a device's peak times a stated utilisation per phase (UTILISATION: what a well-fed
training step, a memory-bound decode and a convolution network reach). Peaks: the vendors' dense bf16 figures
for GPUs, and for the CPU the float32 matmul peak measured on this machine (priors.flops.matmul_peak_flops).
Estimates, not promises; the report puts the measured times beside them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
UTILISATION = {"training": 0.40, "sampling": 0.10, "inception": 0.30}  # "inception" also for the FD extractors
CHECKPOINT_COPIES = 5  # weights, EMA, best copy, AdamW's two moments


@dataclass
class FDCost:
    """One extractor of eval.fd_features in the plan: its forwards and their FLOPs, its reference features' disk;
    all 0 with the reason where it will be n/a at evaluation."""
    name: str
    images: int
    flops_per_image: float
    flops: float
    disk_bytes: int  # the reference features: feature width x float32 x reference rows
    unavailable: str | None = None

    def line(self) -> str:
        if self.unavailable is not None:
            return f"{self.name} n/a at evaluation ({self.unavailable}), costs nothing"
        return (f"{self.name} {self.images:,} images x {self.flops_per_image:.3g} = {self.flops:.3g} FLOPs, "
                f"reference features {format_bytes(self.disk_bytes)}")


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
    disk_bytes: int  # every cache file the plan counts, the FD extractors' reference features included
    peaks: dict[str, float]  # device name -> peak FLOP/s
    fd: list[FDCost] = field(default_factory=list)  # eval.fd_features, in its order

    @property
    def fd_flops(self) -> float:
        return sum(f.flops for f in self.fd)

    @property
    def hours(self) -> dict[str, float]:
        work = ((self.train_flops + self.tokenizer_flops) / UTILISATION["training"]
                + self.sample_flops / UTILISATION["sampling"]
                + (self.inception_flops + self.fd_flops + self.decode_flops) / UTILISATION["inception"])
        return {name: work / peak / 3600 for name, peak in self.peaks.items()}

    def as_results(self) -> dict[str, Any]:
        """The plan_* keys of results.json (bench/results.py); params has its own key, and the FD extractors'
        part is one record by extractor (only where eval.fd_features selects some)."""
        out = asdict(self)
        for name in ("params", "peaks", "fd"):
            out.pop(name)
        fd = {f.name: {k: v for k, v in asdict(f).items() if k != "name"} for f in self.fd}
        return {f"plan_{k}": v for k, v in out.items()} | {K.PLAN_HOURS: self.hours} | ({K.PLAN_FD: fd} if fd else {})

    def lines(self) -> list[str]:
        hours = ", ".join(f"{name} {format_hours(h)}" for name, h in self.hours.items())
        fd = ["cost: FD extractors (the reference, samples and baseline rows' val images Inception sees, not the "
              "completions): " + "; ".join(f.line() for f in self.fd)] if self.fd else []
        return [
            f"cost: {self.params:,} parameters; training {self.train_flops:.3g} FLOPs, sampling "
            f"{self.sample_flops:.3g} FLOPs, Inception {self.inception_images:,} images ({self.inception_flops:.3g} "
            f"FLOPs), " + (f"FD {self.fd_flops:.3g} FLOPs, " if self.fd else "")
            + f"tokenizer {self.tokenizer_flops + self.decode_flops:.3g} FLOPs; cache disk "
            f"{format_bytes(self.disk_bytes)}",
            *fd,
            f"cost: estimated time {hours} (utilisation: training {UTILISATION['training']:.0%}, sampling "
            f"{UTILISATION['sampling']:.0%}, Inception{' and FD' if self.fd else ''} "
            f"{UTILISATION['inception']:.0%} of peak)",
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


# ---- the FD extractors of eval.fd_features -------------------------------------

# DINOv2's hub models (facebookresearch/dinov2, hub/backbones.py and models/vision_transformer.py; no register
# tokens): (embed dim, depth, FFN); the FFN an MLP of 4 x the width, or for ViT-g the fused SwiGLU whose hidden
# width layers/swiglu_ffn.py rounds from 4 x the width (swiglu_hidden). torch-fidelity resizes to 224 x 224.
DINOV2_SIZE, DINOV2_PATCH = 224, 14
DINOV2_ARCH = {"dinov2-vit-s-14": (384, 12, "mlp"), "dinov2-vit-b-14": (768, 12, "mlp"),
               "dinov2-vit-l-14": (1024, 24, "mlp"), "dinov2-vit-g-14": (1536, 40, "swiglu")}
# CLIP's image towers as OpenAI publishes them (the shapes torch-fidelity's build_model reads from the file):
# (vision layers: a count for a ViT, four stage depths for a ResNet; width; patch; input resolution; embedding).
CLIP_ARCH = {
    "clip-rn50": ((3, 4, 6, 3), 64, None, 224, 1024),
    "clip-rn101": ((3, 4, 23, 3), 64, None, 224, 512),
    "clip-rn50x4": ((4, 6, 10, 6), 80, None, 288, 640),
    "clip-rn50x16": ((6, 8, 18, 8), 96, None, 384, 768),
    "clip-rn50x64": ((3, 15, 36, 10), 128, None, 448, 1024),
    "clip-vit-b-32": (12, 768, 32, 224, 512),
    "clip-vit-b-16": (12, 768, 16, 224, 512),
    "clip-vit-l-14": (24, 1024, 14, 224, 768),
    "clip-vit-l-14-336px": (24, 1024, 14, 336, 768),
}


def swiglu_hidden(width: int) -> int:
    """The fused SwiGLU's hidden width for an FFN of 4 x width: two thirds of it, rounded up to a multiple of 8."""
    return (int(4 * width * 2 / 3) + 7) // 8 * 8


def vit_flops(image: int, patch: int, width: int, depth: int, ffn: str = "mlp") -> int:
    """FLOPs of one forward of a ViT with a class token (FlopCounterMode's convention: 2 per multiply-add of a
    matmul or convolution; norms, softmax and the positional embedding's resize count 0): the patch embedding,
    per block the q/k/v and output projections, the attention's two products over N x N token pairs, and the
    FFN (an MLP of 4 x width, or SwiGLU: one projection to twice its hidden width, one back)."""
    patches = (image // patch) ** 2
    n = patches + 1
    embed = 2 * patches * width * 3 * patch * patch
    attention = 2 * n * width * 4 * width + 4 * n * n * width
    mlp = 2 * n * 3 * width * swiglu_hidden(width) if ffn == "swiglu" else 2 * n * 2 * width * 4 * width
    return embed + depth * (attention + mlp)


def clip_visual(name: str, device: str = "meta") -> torch.nn.Module:
    """torch-fidelity's CLIP image tower of `name` with random (meta: no) weights."""
    from torch_fidelity.feature_extractor_clip import CLIPVisual

    layers, width, patch, resolution, embed = CLIP_ARCH[name]
    with torch.device(device):
        return CLIPVisual(embed, resolution, layers, width, patch).visual.eval()


def fd_input_size(name: str) -> int:
    return DINOV2_SIZE if name in DINOV2_ARCH else CLIP_ARCH[name][3]


def fd_feature_width(name: str) -> int:
    return DINOV2_ARCH[name][0] if name in DINOV2_ARCH else CLIP_ARCH[name][4]


_FD_FLOPS: dict[str, float] = {}


def fd_flops_per_image(name: str) -> float:
    """FLOPs of one forward of extractor `name` at torch-fidelity's input size (its resize and normalisation count
    0, as Inception's): CLIP's network on the meta device under FlopCounterMode, DINOv2's by vit_flops."""
    if name in DINOV2_ARCH:
        width, depth, ffn = DINOV2_ARCH[name]
        return float(vit_flops(DINOV2_SIZE, DINOV2_PATCH, width, depth, ffn))
    if name not in _FD_FLOPS:
        from torch.utils.flop_counter import FlopCounterMode

        net = clip_visual(name)
        size = fd_input_size(name)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 3, size, size, device="meta"))
        _FD_FLOPS[name] = float(counter.get_total_flops())
    return _FD_FLOPS[name]


def fd_unavailable(name: str, value: Any) -> str | None:
    """Why extractor `name` will be n/a at evaluation, from the files alone (bench.features.plan_fd_extractor, the
    rule load_fd_extractor applies, nothing loaded or downloaded): no weights at hand and none asked for, or
    DINOv2's code missing from torch's hub folder. None when it will run; an option naming a file that cannot be
    had fails the job by itself."""
    from bench import features as FE
    from bench.errors import ConfigError

    try:
        FE.plan_fd_extractor(name, value)
    except FE.FDUnavailable as e:
        return str(e)
    except ConfigError:
        pass  # a named file that cannot be had: the job fails with that error, it is not n/a
    return None


def fd_selection(eval_cfg: Any) -> list[tuple[str, Any]]:
    """(extractor, its eval.fd_weights value) for each of eval.fd_features (one name alone is a list of one, as
    bench.options.EvalConfig reads it)."""
    names = getattr(eval_cfg, "fd_features", None) or []
    names = [names] if isinstance(names, str) else list(names)
    weights = getattr(eval_cfg, "fd_weights", None) or {}
    return [(str(n), weights.get(n)) for n in names]


def fd_costs(eval_cfg: Any, n_reference: int, n_samples: int, n_val: int) -> list[FDCost]:
    """Each selected extractor's part: the reference rows, the samples, and both baseline rows' val images at the
    samples' N where the val split has that many (bench.evaluate: build_fd_references, fd_part, baseline_row)."""
    images = n_reference + n_samples + (2 * n_samples if n_samples <= n_val else 0)
    out = []
    for name, value in fd_selection(eval_cfg):
        reason = fd_unavailable(name, value)
        if reason is not None:
            out.append(FDCost(name, 0, 0.0, 0.0, 0, reason))
            continue
        per_image = fd_flops_per_image(name)
        out.append(FDCost(name, images, per_image, images * per_image,
                          n_reference * fd_feature_width(name) * FLOAT))
    return out


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
    # Reference, samples, completions, and the two baseline rows (real val images, reconstructions): their val
    # images at N (only where the val split has N) and their completion rows (bench.evaluate.baseline_row).
    n_comp = counts[K.N_COMPLETIONS]
    baseline = (n_samples if n_samples <= counts[K.N_VAL] else 0) + (n_comp if n_comp >= 2 else 0)
    images = counts[K.N_REFERENCE] + n_samples + n_comp + 2 * baseline
    inception_flops = images * inception_per_image
    fd = fd_costs(e, counts[K.N_REFERENCE], n_samples, counts[K.N_VAL])
    encode, decode = codec
    vq_train = 3 * (encode + decode) * tokenizer_training[0] * tokenizer_training[1] if tokenizer_training else 0.0
    vq_encode = encode * counts.get("n_encoded", counts["n_train"] + counts[K.N_VAL])
    vq_decode = decode * (counts[K.N_VAL] + n_samples + counts[K.N_COMPLETIONS])
    peaks = dict(GPU_PEAKS)
    if own_peak:
        peaks[own_peak[0]] = own_peak[1]
    disk = disk_bytes(prior, params, counts["n_train"] + counts[K.N_VAL], counts[K.N_REFERENCE], n_samples,
                      counts[K.N_COMPLETIONS], resolution, logits=False)
    disk += sum(f.disk_bytes for f in fd)
    return Cost(params, train_flops, sample_flops, images, inception_flops, vq_train + vq_encode, vq_decode, disk,
                peaks, fd)


def total(costs: list[Cost], keys: list[dict[str, str]] | None = None) -> Cost:
    """A sweep's total over its jobs' estimates. keys: per job, the cache keys of its "tokens", "train" and
    "eval" stages; each phase is then counted once per key, as the sweep computes it once (AR's points at other
    T reuse one training and one evaluation, absorbing's trains once for every T)."""
    keys = keys or [{"tokens": str(i), "train": str(i), "eval": str(i)} for i in range(len(costs))]
    seen: dict[str, set[str]] = {"tokens": set(), "train": set(), "eval": set()}
    sums = dict.fromkeys(("params", "train", "sample", "images", "inception", "tokenizer", "decode", "disk"), 0.0)
    fd: dict[str, FDCost] = {}  # by extractor, over the evaluations that select it
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
            for f in c.fd:
                if f.name not in fd:
                    fd[f.name] = FDCost(f.name, f.images, f.flops_per_image, f.flops, f.disk_bytes, f.unavailable)
                    continue
                t = fd[f.name]
                t.images, t.flops, t.disk_bytes = t.images + f.images, t.flops + f.flops, t.disk_bytes + f.disk_bytes
                t.flops_per_image = t.flops_per_image or f.flops_per_image
                # n/a in the total only where it is n/a in every job (a job with other weights runs it)
                t.unavailable = t.unavailable if f.unavailable is not None else None
    return Cost(int(sums["params"]), sums["train"], sums["sample"], int(sums["images"]), sums["inception"],
                sums["tokenizer"], sums["decode"], int(sums["disk"]), dict(costs[0].peaks) if costs else {},
                list(fd.values()))
