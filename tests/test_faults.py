"""Faults a user meets between runs: resumable state that cannot be read is moved aside, not fatal."""
from __future__ import annotations

import re

import torch

from tests.clitools import job_results, run_cli
from tests.test_reliability import final_weights

SMOKE = ["experiment=smoke", "logger=none"]
TRAIN = SMOKE + ["prior=ar", "stage=train"]


def test_a_truncated_resumable_checkpoint_is_moved_aside_and_training_restarts(copy_token_cache, tmp_path):
    whole = copy_token_cache(tmp_path / "whole")
    p = run_cli(TRAIN + [f"paths.cache={whole}", f"hydra.run.dir={tmp_path / 'out_whole'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    [r] = job_results(tmp_path / "out_whole")

    # What `truncate -s 50%` or a full disk leaves of a checkpoint: the first half of a torch.save file.
    broken = copy_token_cache(tmp_path / "broken")
    work = broken / "train" / f"{r['train_key']}.work"
    work.mkdir(parents=True)
    saved = (whole / "train" / r["train_key"] / "model.pt").read_bytes()
    (work / "model.ckpt").write_bytes(saved[: len(saved) // 2])
    for attempt in range(2):  # before, every rerun failed on the same file until it was deleted by hand
        p = run_cli(TRAIN + [f"paths.cache={broken}", f"hydra.run.dir={tmp_path / f'out{attempt}'}"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        if attempt == 0:
            log = p.stdout + p.stderr
            assert re.search(r"model: resumable checkpoint \S+model\.ckpt cannot be read \(.+\); moved aside to "
                             r"\S+model\.ckpt\.unreadable, training from scratch", log), log[-3000:]
            assert "Traceback" not in log
    (w_a, v_a), (w_b, v_b) = final_weights(whole), final_weights(broken)
    assert v_a == v_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
