"""What exists only at paper scale (experiment=ffhq_tab3), at its real sizes on the CPU: the train match of 5,000
sample grids against 60,000 training grids of 256 tokens, and the sample evaluation at N = 50,000 in chunks.

Memory is the peak resident set of this process while the code runs (Linux: /proc/self/status VmHWM, reset
through /proc/self/clear_refs), against a bound counted from the chunk sizes the code uses."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import evaluate as E
from bench import features as FE
from bench import keys
from bench import metrics as M
from bench import stats as S
from bench.evaluate import position_blocks, train_match
from bench.options import EvalConfig
from bench.tokens import TokenSet, decode_tokens
from image_tokenizers import build_tokenizer
from tests.memtools import tensor_peak
from tests.toy_prior import ToyPrior

MIB = 2 ** 20
M_TRAIN, L, V = 60_000, 256, 1024  # FFHQ's train split, a 16 x 16 grid, taming's f16 FFHQ codebook
MATCH_SAMPLES = 5_000  # ffhq_tab3's eval.match_samples
# What a measured peak (tests/memtools.tensor_peak: live tensor bytes, the same in any process state) may hold
# beyond the counted tensors: small temporaries (indices, reductions), far below any one chunk the bounds count.
ALLOCATOR_SLACK = 8 * MIB


def planted_grids(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[int, float]]:
    """60,000 random training grids and 5,000 random sample grids, some replaced by copies of training grids with
    k positions changed to other codes; returns (samples, train, {sample row: its planted answer (L - k) / L}).

    A random grid agrees with another in L / V = 0.25 positions on average (sd 0.5); its best of 60,000 stays far
    below L - 40 = 216, so a planted copy's nearest training grid is its source, with agreement exactly L - k."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(V, (M_TRAIN, L), generator=g)
    samples = torch.randint(V, (MATCH_SAMPLES, L), generator=g)
    rows = torch.randperm(MATCH_SAMPLES, generator=g)[:50].tolist()
    sources = torch.randint(M_TRAIN, (len(rows),), generator=g).tolist()
    planted = {}
    for n, (row, src) in enumerate(zip(rows, sources)):
        k = [0, 1, 7, 40][n % 4]
        grid = train[src].clone()
        pos = torch.randperm(L, generator=g)[:k]
        grid[pos] = (grid[pos] + torch.randint(1, V, (k,), generator=g)) % V  # another code at each
        samples[row] = grid
        planted[row] = (L - k) / L
    return samples, train, planted


def brute_force_match(samples: torch.Tensor, train: torch.Tensor) -> list[float]:
    """One sample row at a time against every training grid, int64 codes and counts."""
    return [int((train == s).sum(1).max()) / train.shape[1] for s in samples]


@pytest.fixture(scope="module")
def planted():
    return planted_grids(seed=0)


def test_train_match_at_60k_training_grids_matches_brute_force_and_planted_copies(planted):
    """The real training set (60,000 grids of 256 tokens), 150 of the 5,000 sample rows: the planted ones and 100
    random ones, whose brute-force answers are compared; every max_cells gives the same answers, whether a chunk
    holds several sample rows against all 60,000 grids or the training grids are cut into blocks."""
    samples, train, answers = planted
    planted_rows = sorted(answers)
    random_rows = [r for r in range(MATCH_SAMPLES) if r not in answers][:100]
    rows = planted_rows + random_rows
    got = train_match(samples[rows], train)
    assert got[:len(planted_rows)].tolist() == [answers[r] for r in planted_rows]
    assert (got[:len(planted_rows)] == 1.0).sum() == sum(1 for a in answers.values() if a == 1.0) > 0
    check = rows[::10]  # brute force on a subset: 15 rows, all four kinds of plant among them
    assert train_match(samples[check], train).tolist() == brute_force_match(samples[check], train)
    # random grids: their best agreement is the max of 60,000 near-binomial(256, 1/1024) counts, a few tokens
    assert got[len(planted_rows):].max() < 40 / L
    # 2^20 cells: training grids in blocks of 4,096 (the last one short), one sample row per chunk; 1,000 x 256:
    # blocks of 1,000 grids; L * M_TRAIN * 3: three sample rows against all grids
    for cells in (2 ** 20, 1000 * L, 3 * L * M_TRAIN):
        assert train_match(samples[check], train, max_cells=cells).tolist() == got[::10].tolist()


def test_train_match_chunk_memory_is_one_byte_per_compared_token(planted):
    """Peak memory of a train match at the real training set size, against the bound counted from its chunks:
    the training codes as int16 (M x L x 2 bytes), one chunk of max_cells compared tokens at one byte each, and
    per (sample row, training grid) pair of the chunk its uint8 block counts (L / position_blocks(L) blocks) and
    two int64 agreement rows. A chunk summed in int64 (torch's default for bool) would need 8 bytes per token."""
    samples, train, _ = planted
    cells = 2 ** 26
    rows = cells // (M_TRAIN * L)  # sample rows per chunk: all 60,000 training grids fit
    pairs = rows * M_TRAIN
    bound = M_TRAIN * L * 2 + cells + pairs * (position_blocks(L) + 2 * 8)
    train_match(samples[:2], train[:100])  # the first call's one-off allocations (kernels, thread pools)
    peak, got = tensor_peak(lambda: train_match(samples[:2 * rows], train, max_cells=cells))
    assert len(got) == 2 * rows
    assert peak <= bound + ALLOCATOR_SLACK, (peak / MIB, bound / MIB)
    assert bound + ALLOCATOR_SLACK < cells * 8  # the int64 sum of one chunk alone would exceed it
    print(f"train match of {2 * rows} samples x {M_TRAIN} grids: peak {peak / MIB:.1f} MiB above start "
          f"(bound {bound / MIB:.1f} MiB)")


@pytest.mark.slow
def test_train_match_of_5000_samples_against_60k_grids_in_full(planted):
    """The whole search of ffhq_tab3 (5,000 x 60,000 x 256 = 7.7e10 compared tokens) on the CPU: every planted
    answer, the brute force on 20 rows, and the random rows far from any training grid."""
    samples, train, answers = planted
    t0 = time.perf_counter()
    got = train_match(samples, train)
    seconds = time.perf_counter() - t0
    assert [got[r] for r in sorted(answers)] == [answers[r] for r in sorted(answers)]
    check = list(range(0, MATCH_SAMPLES, MATCH_SAMPLES // 20))
    assert got[check].tolist() == brute_force_match(samples[check], train)
    others = np.delete(got, sorted(answers))
    assert others.max() < 40 / L
    print(f"train match 5000 x 60000 x 256: {seconds:.0f} s")


# ---- the sample evaluation at N = 50,000 ------------------------------------------------------------------------

N_EVAL = 50_000  # ffhq_tab3's eval.num_samples
SIDE, PATCH, LEVELS = 64, 8, 4  # toy tokenizer: 8 x 8 grids of 64 codes, 64 x 64 images (12 KiB each)
POOL_DIM, N_CLASSES = 32, 10


class CheapExtractor(FE.FeatureExtractor):
    """A deterministic stand-in for Inception through the harness's extractor interface: 8 x 8 average pooling,
    then fixed random linear maps to a 32-d pool feature and 10 logits. Records the batch of every call."""

    def __init__(self, weights: Path):
        g = torch.Generator().manual_seed(1)
        net = torch.nn.Sequential(torch.nn.AvgPool2d(SIDE // 8), torch.nn.Flatten())
        self.pool_map = torch.randn(3 * 8 * 8, POOL_DIM, generator=g) / 8
        self.class_map = torch.randn(POOL_DIM, N_CLASSES, generator=g)
        weights.write_bytes(b"cheap extractor")
        super().__init__(net, "cheap", True, weights, "cpu")
        self.calls: list[int] = []

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(len(images))
        return super().__call__(images)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool = torch.tanh(self.net(images.float() / 255) @ self.pool_map)
        return {FE.FEATURE_POOL: pool, FE.FEATURE_LOGITS: pool @ self.class_map}


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """An EvalRun of the real evaluation at ffhq_tab3's sizes and batches (N = 50,000 samples in sampling batches
    of 50, feature batches of 64, 5,000 match samples) over a toy prior, the toy tokenizer and the cheap
    extractor; the reference is the extractor's features of 2,000 decoded random grids."""
    root = tmp_path_factory.mktemp("scale_eval")
    tokenizer, _ = build_tokenizer({"name": "toy", "class": "tests.toy_tokenizer:ToyTokenizer", "patch": PATCH,
                                    "levels": LEVELS, "encode_batch_size": 64, "hflip_train": False}, resolution=SIDE)
    tokenizer.load(root, "cpu")
    K, grid = tokenizer.codebook_size, tokenizer.grid
    g = torch.Generator().manual_seed(2)
    train = torch.randint(K, (2_000, grid[0] * grid[1]), generator=g)
    val = torch.randint(K, (200, grid[0] * grid[1]), generator=g)
    tokens = TokenSet(train, val, K, grid, "tokens", "tokenizer", {}, torch.arange(K), root, tokenizer)
    prior = ToyPrior(K, grid)
    with torch.no_grad():
        prior.model.logits.copy_(torch.randn(prior.model.logits.shape, generator=g))
    extractor = CheapExtractor(root / "cheap.bin")
    ref_feats = FE.images_to_features(decode_tokens(tokenizer, train, tokens.inverse, grid), extractor)
    cfg = EvalConfig(num_samples=N_EVAL, batch_size=50, feature_batch_size=64, num_reference=None, bootstrap=20,
                     prdc_samples=1000, completion_samples=100, match_samples=5_000)
    device = torch.device("cpu")
    E.device_peak_flops(str(device), torch.get_num_threads())  # measured once per process: not in the peak
    return E.EvalRun(prior, tokens, tokenizer, extractor, ref_feats, M.features_to_statistics(ref_feats["pool"]),
                     cfg, 0, device, "fp32", lambda part: None, torch.Generator().manual_seed(0))


def test_sample_evaluation_at_50k_streams_features_and_equals_the_unchunked_path(eval_run):
    """The samples and metrics parts at N = 50,000: the extractor sees the feature batches it would see over all
    images at once (781 x 64, then 16), the peak memory stays at the bound counted below (all 50,000 images
    would be 614 MB), and features, FID, KID, IS, PRDC with their intervals and the train match equal the
    unchunked computation: every image decoded at once, then features and metrics of them."""
    run, cfg = eval_run, eval_run.cfg
    run.extractor.calls.clear()
    t0 = time.perf_counter()
    peak, drawn = tensor_peak(lambda: E.samples_part(run, {}))
    sample_seconds = time.perf_counter() - t0
    assert run.extractor.calls == [64] * (N_EVAL // 64) + [N_EVAL % 64]
    assert drawn[E.RESULTS][keys.N_SAMPLES] == N_EVAL and drawn["tokens"].shape == (N_EVAL, 64)
    image_bytes = 3 * SIDE * SIDE
    assert drawn["grid_images"].shape == (E.GRID_SAMPLES, 3, SIDE, SIDE)
    # The bound: what the part keeps (the token grids, N x L int64, and the features, N x (pool + logits) float32,
    # one tensor each), and what is alive at once per batch, each counted three times (input, output and a
    # concatenation or copy): the images pending and arriving (< 64 + 50), a batch's decode (int64 levels, 3 per
    # pixel-block, then the uint8 image), the extractor's float32 input of 64 images, the toy prior's
    # probabilities (50 x L x V float32); and the 64 kept images.
    kept = N_EVAL * 64 * 8 + N_EVAL * (POOL_DIM + N_CLASSES) * 4
    alive = 3 * ((64 + 50) * image_bytes + 50 * 3 * 64 * 8 + 50 * image_bytes + 64 * image_bytes * 4
                 + 50 * 64 * 64 * 4) + E.GRID_SAMPLES * image_bytes
    assert peak <= kept + alive + ALLOCATOR_SLACK, (peak / MIB, (kept + alive) / MIB)
    assert kept + alive + ALLOCATOR_SLACK < N_EVAL * image_bytes / 10  # holding every image: 10x more

    t1 = time.perf_counter()
    metrics = E.metrics_part(run, {E.SAMPLES_PART: drawn})[E.RESULTS]
    metric_seconds = time.perf_counter() - t1

    images = decode_tokens(run.tokenizer, drawn["tokens"], run.tokens.inverse, run.tokens.grid, batch_size=N_EVAL)
    assert images.shape == (N_EVAL, 3, SIDE, SIDE) and torch.equal(images[:E.GRID_SAMPLES], drawn["grid_images"])
    feats = FE.images_to_features(images, run.extractor, batch_size=cfg.feature_batch_size)
    for k in feats:
        assert torch.equal(feats[k], drawn["features"][k]), k
    whole, _ = E.sample_metrics(run.ref_feats[FE.FEATURE_POOL], run.ref_stats, feats, cfg, run.seed)
    whole.update(E.train_match_metrics(drawn["tokens"][:cfg.match_samples], run.tokens.train))
    assert {k: metrics[k] for k in whole} == whole
    for k in (keys.FID, keys.KID_MEAN, keys.IS_MEAN, keys.PRDC_PRECISION, keys.COVERAGE, keys.TRAIN_MATCH):
        assert metrics[k] is not None and math.isfinite(metrics[k]) and metrics[f"{k}_ci"] is not None, k
    print(f"N = {N_EVAL}: samples part {sample_seconds:.1f} s, peak {peak / MIB:.1f} MiB above start "
          f"(bound {(kept + alive) / MIB:.1f} MiB); metrics part {metric_seconds:.1f} s")


def test_prdc_intervals_resample_the_rows_prdc_was_computed_on(monkeypatch):
    """At N above eval.prdc_samples the PRDC value is computed on seeded subsamples of prdc_samples rows per side
    (n x n distances); its intervals resample those rows too, never all N (at N = 50,000: 20 GB per matrix)."""
    g = np.random.default_rng(0)
    ref = torch.from_numpy(g.normal(size=(3000, 8)))
    fake = {FE.FEATURE_POOL: torch.from_numpy(g.normal(size=(2500, 8)))}
    cfg = EvalConfig(num_samples=2500, prdc_samples=200, bootstrap=10)
    shapes = []
    resampler = S.PRDCResampler

    class Recording(resampler):
        def __init__(self, real, fake_rows, k):
            shapes.append((len(real), len(fake_rows)))
            super().__init__(real, fake_rows, k)

    monkeypatch.setattr(S, "PRDCResampler", Recording)
    out, _ = E.sample_metrics(ref, M.features_to_statistics(ref), fake, cfg, seed=3)
    assert shapes == [(200, 200)]
    real_prdc = M.subsample_rows(ref.numpy(), 2500, cfg.split_seed + E.PRDC_DRAW)  # sample_metrics' real side
    rows = M.prdc_rows(real_prdc, fake[FE.FEATURE_POOL], cfg.prdc_samples, 3)
    assert [len(r) for r in rows] == [200, 200]
    assert M.features_to_prdc(torch.from_numpy(real_prdc), fake[FE.FEATURE_POOL], k=cfg.prdc_k, max_samples=200,
                              seed=3) == {k: out[k] for k in keys.PRDC_KEYS}
    values = {name: out[k] for name, k in zip(S.PRDCResampler.NAMES, keys.PRDC_KEYS)}
    monkeypatch.setattr(S, "PRDCResampler", resampler)
    expected = S.prdc_estimates(*rows, cfg.prdc_k, values, cfg.bootstrap, 3 + 2)
    for name, k in zip(S.PRDCResampler.NAMES, keys.PRDC_KEYS):
        assert out[f"{k}_ci"] == list(expected[name].ci), k
