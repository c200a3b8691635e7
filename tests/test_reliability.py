"""Reliability: resume after SIGKILL, checkpoint on SIGTERM, rebuilt corrupt caches, isolated job failures."""
from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.train import train_unit
from priors import build_prior
from tests.clitools import job_results, popen_cli, run_cli
from tests.conftest import copy_shared_stages

SMOKE = ["experiment=smoke", "logger=none"]
def wait_for_checkpoint(cache: Path, min_step: int, proc, timeout: float = 120) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        for ckpt in cache.glob("train/*.work/model.ckpt"):
            try:
                if torch.load(ckpt, weights_only=True)["step"] >= min_step:
                    return ckpt
            except Exception:  # noqa: BLE001 - a file being replaced right now
                pass
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def final_weights(cache: Path) -> tuple[dict, float]:
    [d] = [p for p in cache.glob("train/*") if p.is_dir() and not p.name.endswith(".work")
           and not p.name.startswith(".")]
    assert not list(cache.glob("train/.*.tmp-*"))  # a killed build's temporary folder is cleaned up
    ckpt = torch.load(d / "model.pt", weights_only=True)
    return ckpt["state_dict"], ckpt["best_val"]


LONG_STEPS = 200  # killed once a checkpoint of step 60 or later exists, then resumed to the end
LONG = ["prior=ar", "stage=train", f"train.steps={LONG_STEPS}", "train.ckpt_every=20", "train.val_every=100"]


def test_sigkill_then_rerun_resumes_to_the_uninterrupted_result(copy_token_cache, tmp_path):
    whole = copy_token_cache(tmp_path / "whole")
    p = run_cli(SMOKE + LONG + [f"paths.cache={whole}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]

    killed = copy_token_cache(tmp_path / "killed")
    proc = popen_cli(SMOKE + LONG + [f"paths.cache={killed}"], cwd=tmp_path)
    wait_for_checkpoint(killed, 60, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = torch.load(next(killed.glob("train/*.work/model.ckpt")), weights_only=True)["step"]
    assert step_at_kill < LONG_STEPS

    p = run_cli(SMOKE + LONG + [f"paths.cache={killed}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    (w_a, v_a), (w_b, v_b) = final_weights(whole), final_weights(killed)
    assert v_a == v_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_sigterm_writes_a_checkpoint_and_exits_for_requeue(copy_token_cache, tmp_path):
    cache = copy_token_cache(tmp_path / "cache")
    proc = popen_cli(SMOKE + LONG + ["train.ckpt_every=1000", "train.steps=2000", f"paths.cache={cache}"],
                     cwd=tmp_path)
    # No periodic checkpoint before step 1000: wait until training is under way, then preempt.
    t0 = time.time()
    while not list(cache.glob("train/*.work")):
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM at step" in out and "checkpoint written" in out
    ckpt = torch.load(next(cache.glob("train/*.work/model.ckpt")), weights_only=True)
    assert 0 < ckpt["step"] < 1000


UNITS = ["prior=imagebart", "T=3", "stage=train", "train.steps=300", "train.ckpt_every=20", "train.val_every=100",
         "threads=2", "unit_workers=2"]


def unit_weights(cache: Path) -> dict[str, dict]:
    [d] = [p for p in cache.glob("train/*") if p.is_dir() and not p.name.endswith(".work")
           and not p.name.startswith(".")]
    return {u: torch.load(d / f"{u}.pt", weights_only=True) for u in ("scale2", "scale3")}


# Three full CLI trainings of two units at once. Its parts run by default, each cheaper: SIGTERM's checkpoint and
# exit code (test_sigterm_writes_a_checkpoint_and_exits_for_requeue), a killed training resumed to the
# uninterrupted weights (test_sigkill_then_rerun_resumes_to_the_uninterrupted_result), and units in two
# processes equal to one after another (tests/test_train.py::test_units_at_once_equal_units_one_after_another).
@pytest.mark.slow
def test_sigterm_while_units_train_at_once_checkpoints_each_and_the_rerun_resumes(copy_token_cache, tmp_path):
    # ImageBART T=3's two scales train in two processes; the scheduler's SIGTERM reaches only the job's process.
    whole = copy_token_cache(tmp_path / "whole")
    p = run_cli(SMOKE + UNITS + [f"paths.cache={whole}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 at once" in p.stdout + p.stderr

    cache = copy_token_cache(tmp_path / "cache")
    proc = popen_cli(SMOKE + UNITS + [f"paths.cache={cache}"], cwd=tmp_path)
    t0 = time.time()
    while len(list(cache.glob("train/*.work/scale*.ckpt"))) < 2:  # both scales under way
        assert proc.poll() is None and time.time() - t0 < 120, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert len(re.findall(r"WARNING\] - SIGTERM at step \d+ of imagebart:scale[23]", out)) == 2, out[-3000:]
    steps = [torch.load(c, weights_only=True)["step"] for c in cache.glob("train/*.work/scale*.ckpt")]
    assert len(steps) == 2 and all(0 < s < 300 for s in steps), steps

    p = run_cli(SMOKE + UNITS + [f"paths.cache={cache}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (p.stdout + p.stderr).count("resumed from") == 2
    a, b = unit_weights(whole), unit_weights(cache)
    for unit in a:
        assert a[unit]["best_val"] == b[unit]["best_val"]
        assert all(torch.equal(v, b[unit]["state_dict"][k]) for k, v in a[unit]["state_dict"].items()), unit


TRUNCATED = SMOKE + ["prior=absorbing", "T=2"]


@pytest.fixture(scope="module")
def complete_cache(smoke_token_cache, tmp_path_factory):
    """Every stage of one smoke job built once: (its cache, its results); each test truncates a copy."""
    root = tmp_path_factory.mktemp("complete")
    cache = copy_shared_stages(smoke_token_cache, root / "cache")
    (root / "a").mkdir()
    first = run_cli(TRUNCATED + [f"paths.cache={cache}"], cwd=root / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    [a] = job_results(root / "a")
    return cache, a


# Every stage is checked by the same cached_stage code (its manifest of file sizes and hashes): the default run
# truncates the first stage, the prior's own and the last; the middle stages, the same check on other files,
# run with -m slow. tests/test_cache.py checks each kind of damage on that code directly.
SAME_CHECK = pytest.mark.slow


@pytest.mark.parametrize("stage,filename", [
    ("data", "train.npy"), pytest.param("tokenizer", "model.pt", marks=SAME_CHECK),
    pytest.param("tokens", "tokens.pt", marks=SAME_CHECK), pytest.param("reference", "features.pt", marks=SAME_CHECK),
    ("train", "model.pt"), ("eval", "metrics.json"),
])
def test_truncated_cache_file_is_rebuilt(complete_cache, tmp_path, stage, filename):
    complete, a = complete_cache
    cache = tmp_path / "cache"
    shutil.copytree(complete, cache)
    (tmp_path / "b").mkdir()
    [target] = [p for p in cache.glob(f"{stage}/*/{filename}")]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    second = run_cli(TRUNCATED + [f"paths.cache={cache}"], cwd=tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"{target.parent} is invalid: {filename} is truncated" in log
    [b] = job_results(tmp_path / "b")
    assert b["status"] == "ok"
    # The rebuilt stage is the same computation on the same kernel and thread counts: the same FID.
    assert a["fid"] == b["fid"]


def test_one_failing_point_does_not_stop_the_sweep(copy_token_cache, tmp_path):
    cache = copy_token_cache(tmp_path / "cache")
    p = run_cli(["-m", "prior=imagebart", "T=1,2", "name=mixed", f"paths.cache={cache}", *SMOKE], cwd=tmp_path)
    assert p.returncode != 0
    jobs = {j["T"]: j for j in job_results(tmp_path / "multirun" / "mixed")}
    assert jobs[1]["status"] == "failed" and "T=1" in jobs[1]["error"] and "\n" not in jobs[1]["error"]
    assert jobs[2]["status"] == "ok" and jobs[2]["fid"] is not None
    report = (tmp_path / "reports" / "mixed" / "report.md").read_text()
    assert "## Failed jobs" in report and "T=1: imagebart needs an integer chain length" in report
    assert "failed: prior=imagebart T=1" in p.stderr


def test_checkpoint_of_another_prior_configuration_is_refused(tmp_path):
    cfg = OmegaConf.create(dict(steps=6, batch_size=4, lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95], warmup_steps=1,
                                min_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.9, val_every=3, val_batches=1,
                                ckpt_every=3))
    x = torch.randint(0, 8, (16, 16))
    small = build_prior("ar", 8, (4, 4), T=2, budget=20000, cfg={"n_layer": 2, "n_head": 2})
    train_unit(small, "model", x, x, cfg, seed=0, work_dir=tmp_path, device=torch.device("cpu"), stop_after=3)
    other = build_prior("ar", 8, (4, 4), T=2, budget=60000, cfg={"n_layer": 2, "n_head": 2})
    with pytest.raises(ConfigError, match=r"checkpoint .*model.ckpt was written by a different prior configuration"):
        train_unit(other, "model", x, x, cfg, seed=0, work_dir=tmp_path, device=torch.device("cpu"))


def test_taming_checkpoint_that_does_not_match_its_config_is_a_one_line_error(tmp_path):
    from image_tokenizers.vqmodel import VQGANConfig, VQModel

    cfg = VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                      embed_dim=8, n_embed=16)
    torch.save({"state_dict": VQModel(cfg).state_dict()}, tmp_path / "last.ckpt")
    (tmp_path / "project.yaml").write_text(
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n    embed_dim: 8\n    n_embed: 32\n"
        "    ddconfig:\n      double_z: false\n      z_channels: 32\n      resolution: 32\n      in_channels: 3\n"
        "      out_ch: 3\n      ch: 32\n      ch_mult: [1, 2, 2]\n      num_res_blocks: 1\n"
        "      attn_resolutions: []\n      dropout: 0.0\n")
    p = run_cli(SMOKE + ["tokenizer=taming", f"tokenizer.ckpt={tmp_path / 'last.ckpt'}",
                         f"tokenizer.config={tmp_path / 'project.yaml'}", f"paths.cache={tmp_path / 'c'}"],
                cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    [line] = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert "does not match tokenizer.config=" in line and "quantize.embedding.weight" in line
    assert not (tmp_path / "c").exists()
