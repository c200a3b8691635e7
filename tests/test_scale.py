"""What exists only at paper scale (experiment=ffhq_tab3), at its real sizes on the CPU: the train match of 5,000
sample grids against 60,000 training grids of 256 tokens, and the sample evaluation at N = 50,000 in chunks.

Memory is the peak resident set of this process while the code runs (Linux: /proc/self/status VmHWM, reset
through /proc/self/clear_refs), against a bound counted from the chunk sizes the code uses."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.evaluate import position_blocks, train_match

MIB = 2 ** 20
M_TRAIN, L, V = 60_000, 256, 1024  # FFHQ's train split, a 16 x 16 grid, taming's f16 FFHQ codebook
MATCH_SAMPLES = 5_000  # ffhq_tab3's eval.match_samples
# What a measured peak may hold beyond the counted tensors: the allocator's page rounding and the few
# interpreter objects a loop creates, far below any one chunk the bounds count.
ALLOCATOR_SLACK = 8 * MIB


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def peak_rss_above_start(fn):
    """(fn(), how far this process's resident set rose above its size at the call, at its highest)."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        pytest.skip("peak resident memory is read from Linux's /proc/self")
    start = _status("VmRSS")
    clear.write_text("5")  # resets VmHWM to the current resident set
    out = fn()
    return out, _status("VmHWM") - start


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
    got, peak = peak_rss_above_start(lambda: train_match(samples[:2 * rows], train, max_cells=cells))
    assert len(got) == 2 * rows
    assert peak <= bound + ALLOCATOR_SLACK, (peak / MIB, bound / MIB)
    assert bound + ALLOCATOR_SLACK < cells * 8  # the int64 sum of one chunk alone would exceed it


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
