"""Faults a user meets between runs: resumable state that cannot be read is moved aside, not fatal."""
from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from bench.cache import cached_stage
from tests.clitools import job_results, popen_cli, run_cli
from tests.conftest import copy_shared_stages
from tests.test_reliability import final_weights

SMOKE = ["experiment=smoke", "logger=none"]
TRAIN = SMOKE + ["prior=ar", "stage=train"]


# Metrics, not timings: a resumed evaluation must give the uninterrupted run's numbers.
METRICS = ("fid", "fid_ci", "kid_mean", "prdc_precision", "recall", "density", "coverage", "train_match",
           "completion_fid", "completion_fid_ci", "nll_bits_per_token", "nll_stderr", "n_samples", "n_completions")
EVAL = SMOKE + ["prior=ar", "eval.num_samples=64"]  # eight sampling batches: time to be interrupted


@pytest.fixture(scope="module")
def uninterrupted(smoke_token_cache, tmp_path_factory) -> tuple[Path, dict]:
    """The run a faulted one must reproduce: its cache and results. EVAL trains the same AR model as TRAIN (the
    evaluation's options are not part of the training's key), so one run serves both tests."""
    root = tmp_path_factory.mktemp("uninterrupted")
    whole = copy_shared_stages(smoke_token_cache, root / "whole")
    p = run_cli(EVAL + [f"paths.cache={whole}", f"hydra.run.dir={root / 'out_whole'}"], cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    [r] = job_results(root / "out_whole")
    return whole, r


def test_a_truncated_resumable_checkpoint_is_moved_aside_and_training_restarts(uninterrupted, copy_token_cache,
                                                                               tmp_path):
    whole, r = uninterrupted

    # What `truncate -s 50%` or a full disk leaves of a checkpoint: the first half of a torch.save file.
    broken = copy_token_cache(tmp_path / "broken")
    work = broken / "train" / f"{r['train_key']}.work"
    work.mkdir(parents=True)
    saved = (whole / "train" / r["train_key"] / "model.pt").read_bytes()
    (work / "model.ckpt").write_bytes(saved[: len(saved) // 2])
    for attempt in range(2):  # before, every rerun failed on the same file until it was deleted by hand
        p = run_cli(TRAIN + [f"paths.cache={broken}", f"hydra.run.dir={tmp_path / f'out{attempt}'}"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        assert job_results(tmp_path / f"out{attempt}")[0]["train_key"] == r["train_key"]
        if attempt == 0:
            log = p.stdout + p.stderr
            assert re.search(r"model: resumable checkpoint \S+model\.ckpt cannot be read \(.+\); moved aside to "
                             r"\S+model\.ckpt\.unreadable, training from scratch", log), log[-3000:]
            assert "Traceback" not in log
    (w_a, v_a), (w_b, v_b) = final_weights(whole), final_weights(broken)
    assert v_a == v_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_sigterm_during_evaluation_keeps_the_finished_parts_and_the_rerun_resumes(uninterrupted, copy_token_cache,
                                                                                   tmp_path):
    whole, r_whole = uninterrupted

    cache = copy_token_cache(tmp_path / "cache")
    shutil.copytree(whole / "train", cache / "train")  # the same trained model: only the evaluation runs
    proc = popen_cli(EVAL + [f"paths.cache={cache}", f"hydra.run.dir={tmp_path / 'out_stopped'}"], cwd=tmp_path)
    t0 = time.time()
    while not list(cache.glob("eval/*.work/samples.pt")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert re.search(r"preempted: SIGTERM during the evaluation of ar \(\w+\): finished parts \(nll, samples[^)]*\) "
                     r"kept in \S+\.work", out), out[-3000:]
    assert not list(cache.glob("eval/.*.tmp-*"))  # no temporary folder left behind
    assert not list((tmp_path / "out_stopped").glob("results.json"))

    p = run_cli(EVAL + [f"paths.cache={cache}", f"hydra.run.dir={tmp_path / 'out_resumed'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "eval: nll resumed from" in log and "eval: samples resumed from" in log
    [r] = job_results(tmp_path / "out_resumed")
    assert {k: r[k] for k in METRICS} == {k: r_whole[k] for k in METRICS}
    assert not list(cache.glob("eval/*.work"))  # the finished evaluation's parts are gone


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_folder_it_could_not_write(tmp_path):
    """Writing to /dev/full fails as a full disk does (errno 28, no file name): the error names the stage."""
    def build(tmp: Path) -> dict:
        with open("/dev/full", "wb") as f:  # what np.save and torch.save meet on a full disk
            f.write(b"features")
        return {}

    with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device: '.*/reference/k1'$"):
        cached_stage(tmp_path, "reference", "k1", build)
    assert not list((tmp_path / "reference").glob(".k1.tmp-*"))  # the unfinished build is removed
