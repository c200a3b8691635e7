"""The plan's memory figures (bench/memory.py) against the tensor memory the harness's own code paths allocate.

Each figure is documented as a lower bound, so every check is two-sided: the estimate is at most the measured
peak (tests/memtools.py: the profiler's allocation record, exact to the byte, no float tolerance), and the measured
peak is at most the estimate plus what it leaves out by design, counted per prior below from the code that runs:
tensors of the vocabulary's width V per token (or per row) that a prior's own loss or sampler adds beside the
logits the figure counts. Sizes: V = 512 codes on 8 x 8 grids, 500k parameters, so activations are tens of MB and
the fixed allocations (token batches, generators, LayerNorm statistics) are well under one V-wide tensor.
Each case is measured at two batch sizes: what the figure says grows with the batch must grow by at least that.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import memory
from bench.options import TrainConfig
from bench.train import train_units
from priors import build_prior, cpu_decode
from tests.memtools import numpy_peak, tensor_peak

pytestmark = pytest.mark.usefixtures("one_thread")

V, GRID, BUDGET = 512, (8, 8), 500_000
L = GRID[0] * GRID[1]
CASES = [("ar", 2), ("imagebart", 2), ("imagebart", 3), ("absorbing", 4)]

# V-wide float32 tensors per token of one training step that the training figure leaves out. It counts the logits
# and their log-softmax; the logits' gradient, a third, exists only after zero_grad has freed the previous step's
# gradients (a P-sized share of the weights figure), so every prior gets at least that one:
#   AR, ImageBART T=2 (one decoder-only scale, plain logits): the logits' gradient
#   absorbing: the logits' gradient, and one more from cross_entropy over the transposed (B, V, L) logits, which
#     its log-softmax reads through a copy
#   ImageBART T=3 (scale 2 has the likelihood residual): the logits' gradient, the head output the residual's scale
#     keeps for its gradient, the residual table, the posterior q(x_{t-1} | x_t, x_1) and the KL's product
TRAIN_LEFT_OUT = {("ar", 2): 1, ("imagebart", 2): 1, ("absorbing", 4): 2, ("imagebart", 3): 5}
# V-wide float32 tensors that the sampling figure leaves out, per row for a cached decoder (beside the step's logits
# and softmax it counts: the previous step's logits, still referenced while the next are computed, sample_logits'
# exponential draws at their largest, the float64 uniforms (two) and their float32 cast (one), alive together
# while casting, and the token grids, three int64 rows of L < 2 V floats' bytes (one)), per token for
# whole-sequence passes:
#   absorbing: the network's logits before the temperature division, and the float64 uniforms its exponential
#     draws are made from (priors.transformer.exponential_draws: two floats' bytes per element)
#   ImageBART T=3: scale 2's likelihood residual table (one per token) and the probabilities and logarithm it is
#     built from
SAMPLE_LEFT_OUT_PER_ROW = {("ar", 2): 5, ("imagebart", 2): 5, ("absorbing", 4): 0, ("imagebart", 3): 5}
SAMPLE_LEFT_OUT_PER_TOKEN = {("ar", 2): 0, ("imagebart", 2): 0, ("absorbing", 4): 3, ("imagebart", 3): 3}
# One-off allocations outside any figure: token batches, the data and noise generators, the scheduler, LayerNorm
# statistics and attention log-sum-exps (a few floats per token and block): below 1 MiB at these sizes.
FIXED = 2 ** 20
MIB = 2 ** 20


def prior_of(name: str, T: int):
    torch.manual_seed(0)
    return build_prior(name, V, GRID, T=T, budget=BUDGET, cfg={"n_layer": 2, "n_head": 4})


def train_cfg(batch: int) -> TrainConfig:
    """Two steps with a validation after each: the second step runs with all six copies of the weights alive
    (weights, the first step's gradients, AdamW's moments, EMA and the best copy the validation kept)."""
    return TrainConfig(steps=2, batch_size=batch, lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95], warmup_steps=0,
                       min_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.99, val_every=1, val_batches=1, ckpt_every=100)


def eval_cfg(rows: int, feature_batch: int = 8, n: int = 64, prdc: int = 64) -> SimpleNamespace:
    return SimpleNamespace(num_samples=n, batch_size=rows, feature_batch_size=feature_batch, prdc_samples=prdc)


def measured_training(name: str, T: int, batch: int, precision: str = "fp32") -> tuple[int, memory.Peak, memory.Peak]:
    """Peak tensor bytes of building the prior and training every unit (the job's path, one unit at a time), the
    figures at that precision and at fp32."""
    g = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, V, (256, L), generator=g), torch.randint(0, V, (batch, L), generator=g)
    cfg = train_cfg(batch)

    def run():
        prior = prior_of(name, T)
        with tempfile.TemporaryDirectory() as d:
            train_units(prior, train, val, cfg, 0, Path(d), torch.device("cpu"), precision)
        return prior

    peak, prior = tensor_peak(run)
    return peak, *(memory.estimate(prior, prior.num_params(), cfg, eval_cfg(8), precision=p)
                   for p in (precision, "fp32"))


@pytest.mark.parametrize("name,T", CASES)
def test_training_figure_is_a_lower_bound_within_what_it_leaves_out(name, T):
    small, big = 32, 64
    got = {b: measured_training(name, T, b)[:2] for b in (small, big)}
    for b, (peak, est) in got.items():
        need = est.weights + est.training
        left_out = TRAIN_LEFT_OUT[(name, T)] * b * L * V * memory.FLOAT + FIXED
        assert need <= peak <= need + left_out, (b, peak / 1e6, need / 1e6, left_out / 1e6)
        print(f"training {name} T={T} batch {b}: measured {peak / MIB:.1f} MiB, figure {need / MIB:.1f} MiB "
              f"({peak / need:.2f}x)")
    # Doubling the batch adds at least the activations the figure counts for the extra sequences.
    (p_small, e_small), (p_big, e_big) = got[small], got[big]
    slope = e_big.training - e_small.training
    extra = TRAIN_LEFT_OUT[(name, T)] * (big - small) * L * V * memory.FLOAT + FIXED
    assert slope <= p_big - p_small <= slope + extra


@pytest.mark.parametrize("name,T", CASES)
def test_bf16_figures_are_lower_bounds(name, T, monkeypatch):
    """precision=bf16 (autocast, here on the CPU): matmul outputs and the KV cache are bf16, so the figures count
    activations at 2 bytes; the residual stream, LayerNorm and softmax outputs stay float32, so the fp32 figures
    plus what they leave out still bound the peak from above, with autocast's bf16 copy of the weights (2 bytes
    per parameter) on top."""
    batch = 32
    peak, bf16, fp32 = measured_training(name, T, batch, "bf16")
    params = bf16.weights  # the weights' share does not depend on the precision
    assert params == fp32.weights and 2 * bf16.training == fp32.training
    left_out = TRAIN_LEFT_OUT[(name, T)] * batch * L * V * memory.FLOAT + FIXED
    copies = memory.BF16 * sum(memory.unit_params(prior_of(name, T)))
    assert bf16.weights + bf16.training <= peak <= fp32.weights + fp32.training + left_out + copies
    print(f"training {name} T={T} batch {batch}, bf16: measured {peak / MIB:.1f} MiB, figure "
          f"{(bf16.weights + bf16.training) / MIB:.1f} MiB ({peak / (bf16.weights + bf16.training):.2f}x)")
    prior, rows = prior_of(name, T), 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peak, _ = tensor_peak(lambda: prior.sample(rows, torch.Generator().manual_seed(0)))
    # Under autocast the samplers take ATen's path (the fused CPU code is float32): the fp32 figure without it.
    monkeypatch.setattr(cpu_decode, "FUSED_DECODE", False)
    est = {p: memory.estimate(prior, prior.num_params(), train_cfg(8), eval_cfg(rows, n=rows), precision=p).sampling
           for p in ("bf16", "fp32")}
    left_out = (SAMPLE_LEFT_OUT_PER_ROW[(name, T)] + SAMPLE_LEFT_OUT_PER_TOKEN[(name, T)] * L) * rows * V
    assert 2 * est["bf16"] == est["fp32"]
    assert est["bf16"] <= peak <= est["fp32"] + left_out * memory.FLOAT + copies + FIXED
    print(f"sampling {name} T={T} {rows} rows, bf16: measured {peak / MIB:.2f} MiB, figure {est['bf16'] / MIB:.2f} "
          f"MiB ({peak / est['bf16']:.2f}x)")


def test_weights_figure_counts_optimizer_state_for_the_training_units_only():
    """ImageBART trains unit by unit: the other scales hold their float32 weights alone."""
    prior = prior_of("imagebart", 5)
    per_unit = memory.unit_params(prior)
    assert len(per_unit) == 4 and sum(per_unit) == prior.num_params()
    one = memory.estimate(prior, prior.num_params(), train_cfg(8), eval_cfg(8), unit_workers=1)
    two = memory.estimate(prior, prior.num_params(), train_cfg(8), eval_cfg(8), unit_workers=2)
    top = sorted(per_unit, reverse=True)
    assert one.weights == memory.FLOAT * (prior.num_params() + 5 * top[0])
    assert two.weights == memory.FLOAT * (prior.num_params() + 5 * (top[0] + top[1]))
    released = memory.estimate(prior, prior.num_params(), train_cfg(8), eval_cfg(8), train=False)
    assert released.weights == memory.FLOAT * prior.num_params() and released.training == 0


def fused_scratch(prior) -> int:
    """Bytes of the fused CPU code's temporary scratch in one call (not per row, so the figure leaves it out): at
    most priors.cpu_decode.scratch_floats of the largest transformer; 0 where the fused code does not run."""
    lay = memory.fused_layout("cpu", "fp32")
    if lay is None:
        return 0
    return memory.FLOAT * max(cpu_decode.scratch_floats(t.cfg, torch.get_num_threads(), lay)
                              for ts in memory.transformers(prior) for t in ts)


@pytest.mark.parametrize("name,T", CASES)
def test_sampling_figure_is_a_lower_bound_within_what_it_leaves_out(name, T):
    """One sampling batch (prior.sample at eval.batch_size rows) beyond the prior's weights, which the sampling
    figure does not count (they exist before the call, so the measurement starts above them). On this CPU the
    fused code samples: the figure counts its copy of the keys and values per row, and leaves out its scratch."""
    got = {}
    for rows in (64, 128):
        prior = prior_of(name, T)  # new weights each time: the fused code packs them in each measured call
        peak, _ = tensor_peak(lambda: prior.sample(rows, torch.Generator().manual_seed(0)))
        est = memory.estimate(prior, prior.num_params(), train_cfg(8), eval_cfg(rows, n=rows)).sampling
        left_out = (SAMPLE_LEFT_OUT_PER_ROW[(name, T)] + SAMPLE_LEFT_OUT_PER_TOKEN[(name, T)] * L) * rows * V
        assert est <= peak <= est + left_out * memory.FLOAT + fused_scratch(prior) + FIXED, (rows, peak / 1e6,
                                                                                          est / 1e6)
        print(f"sampling {name} T={T} {rows} rows: measured {peak / MIB:.2f} MiB, figure {est / MIB:.2f} MiB "
              f"({peak / est:.2f}x)")
        got[rows] = peak, est
    lay = memory.fused_layout("cpu", "fp32")
    packed = 0 if lay is None else memory.FLOAT * sum(cpu_decode.packed_floats(t.cfg, lay)
                                                         for ts in memory.transformers(prior) for t in ts)
    assert got[128][1] - packed == 2 * (got[64][1] - packed)  # the figure is linear in the rows, beside the weights
    assert got[128][1] - got[64][1] <= got[128][0] - got[64][0]


def test_inception_part_of_the_evaluation_figure_per_image():
    """The Inception activations of one feature forward: the figure's stem pair (two adjacent convolutions'
    outputs) against the peak of images_to_features at 2 and 4 images. Left out: the 299 x 299 resized input and
    the stem's first convolution output (3 x 299^2 + 32 x 149^2 floats per image) that coexist with it at most."""
    from bench import features as FE

    extractor = FE.load_feature_extractor()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor(images[:1])  # one-off allocations of the first call
    left_out = (3 * FE.INCEPTION_SIZE ** 2 + 32 * 149 ** 2) * memory.FLOAT
    peaks = {}
    for n in (2, 4):
        peak, _ = tensor_peak(lambda: FE.images_to_features(images[:n], extractor, batch_size=n))
        features, _ = memory.evaluation_parts(eval_cfg(8, feature_batch=n))
        assert features == n * memory.INCEPTION_FLOATS_PER_IMAGE * memory.FLOAT
        assert features <= peak <= features + n * left_out + FIXED, (n, peak / 1e6, features / 1e6)
        print(f"Inception, {n} images: measured {peak / MIB:.1f} MiB, figure {features / MIB:.1f} MiB "
              f"({peak / features:.2f}x)")
        peaks[n] = peak
    assert 2 * memory.INCEPTION_FLOATS_PER_IMAGE * memory.FLOAT <= peaks[4] - peaks[2]
    # A CPU cuts a feature batch into forwards of CPU_FEATURE_CHUNK images; other devices run it whole.
    assert memory.CPU_FEATURE_CHUNK == FE.CPU_CHUNK
    per_image = memory.INCEPTION_FLOATS_PER_IMAGE * memory.FLOAT
    assert memory.evaluation_parts(eval_cfg(8, feature_batch=64))[0] == 8 * per_image
    assert memory.evaluation_parts(eval_cfg(8, feature_batch=64), "cuda")[0] == 64 * per_image


def test_metric_matrices_part_of_the_evaluation_figure():
    """The evaluation's metrics (bench.evaluate.sample_metrics: FID, KID and PRDC with their intervals) on N
    random feature rows: KID's fake-fake kernel and PRDC's real-fake and fake-fake distances are N x N float64
    matrices kept at once. Features of 64 dimensions keep the N x d feature copies small beside them; left out:
    pairwise_distances' temporaries while the last matrix is built (its product, the squared distances and
    their clipped copy: three more N x N), the feature copies (a few N x d float64 each side) and the intervals'
    index sets."""
    from bench import evaluate as EV
    from bench import metrics as M
    from bench.options import EvalConfig

    d, n = 64, 600
    g = np.random.default_rng(0)
    real, fake = g.normal(size=(2 * n, d)), g.normal(size=(n, d)) + 0.1
    ref_stats = M.features_to_statistics(torch.from_numpy(real))
    cfg = EvalConfig(num_samples=n, prdc_samples=n, bootstrap=4)
    feats = {"pool": torch.from_numpy(fake)}
    peak, _ = numpy_peak(lambda: EV.sample_metrics(torch.from_numpy(real), ref_stats, feats, cfg, 0))
    _, matrices = memory.evaluation_parts(cfg)
    assert matrices == 3 * n * n * memory.MATRIX
    left_out = 3 * n * n * memory.MATRIX + 16 * n * d * 8 + FIXED
    assert matrices <= peak <= matrices + left_out, (peak / 1e6, matrices / 1e6)
    print(f"metrics, N = {n}: measured {peak / MIB:.1f} MiB, figure {matrices / MIB:.1f} MiB "
          f"({peak / matrices:.2f}x)")


# ---- the FD extractors of eval.fd_features -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dinov2-vit-s-14", "dinov2-vit-g-14"])
def test_dinov2_activation_formula_equals_the_leaf_pairs_of_an_equivalent_vit(name):
    """DINOv2 cannot be built offline: its arithmetic figure equals leaf_pair_floats on a ViT of the same shapes
    (tests/test_cost.py's torchvision equivalent: GELU MLP, or SwiGLU for ViT-g)."""
    from bench import cost as C
    from tests.test_cost import equivalent_vit

    assert memory.fd_floats_per_image(name) == memory.leaf_pair_floats(equivalent_vit(name), C.DINOV2_SIZE)


def test_clip_vit_leaf_pairs_equal_the_vit_arithmetic():
    """torch-fidelity's CLIP ViTs on the meta device and the same arithmetic agree: the two ways count one thing."""
    from bench import cost as C

    for name, (layers, width, patch, size, _) in C.CLIP_ARCH.items():
        if patch is not None:
            assert memory.fd_floats_per_image(name) == memory.vit_pair_floats(size, patch, width), name


def test_fd_part_of_the_evaluation_figure_is_a_lower_bound(tmp_path, monkeypatch):
    """A small CLIP of torch-fidelity's classes (tests/test_fd.py: ViT-B/32's patch and resolution, width 64) read
    through the real loader: its figure (leaf_pair_floats of the loaded network) is at most the peak of
    images_to_features at 2 and 4 images, and the peak grows by at least the figure per image. The evaluation
    figure takes the largest extractor that will run: an n/a one adds nothing."""
    from bench import features as FE
    from tests.test_fd import clip_file

    extractor = FE.load_fd_extractor("clip-vit-b-32", str(clip_file(tmp_path / "clip.pt", seed=0)))
    per_image = memory.leaf_pair_floats(extractor.net.model.visual, extractor.net.resolution, "cpu") * memory.FLOAT
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor(images[:1])  # one-off allocations of the first call
    peaks = {}
    for n in (2, 4):
        peaks[n], _ = tensor_peak(lambda: FE.images_to_features(images[:n], extractor, batch_size=n))
        assert n * per_image <= peaks[n], (n, peaks[n], per_image)
        print(f"small CLIP, {n} images: measured {peaks[n] / MIB:.2f} MiB, figure {n * per_image / MIB:.2f} MiB")
    assert 2 * per_image <= peaks[4] - peaks[2]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty hub cache
    cfg = eval_cfg(8, feature_batch=8)
    inception = memory.evaluation_parts(cfg)[0]
    cfg.fd_features, cfg.fd_weights = ["clip-rn50x64", "dinov2-vit-s-14"], {"clip-rn50x64": "download"}
    assert memory.evaluation_parts(cfg)[0] == 8 * memory.fd_floats_per_image("clip-rn50x64") * memory.FLOAT > inception
    cfg.fd_weights = {}  # both n/a: Inception's figure alone
    assert memory.evaluation_parts(cfg)[0] == inception
