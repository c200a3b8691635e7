"""The smoke sweep on a real single-node SLURM cluster (`bash .ci/slurm-up`; .ci/run brings one up).

A job requeued mid-training (`scontrol requeue`: SLURM's SIGTERM, the job checkpoints and exits, SLURM runs it again)
resumes from its checkpoint, and the sweep's tokens, images, metrics and trained weights equal the basic
launcher's. A cancelled job, which without SLURM accounting never reports its end, ends the sweep with one line
naming it instead of leaving it polling. Marked `slurm`, so excluded by default (`python -m pytest -m slurm`);
skipped without a cluster, failed instead when PRIORBENCH_REQUIRE_SLURM=1 (as in .ci/run).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.clitools import RUN, cli_env, job_results, run_cli
from tests.test_launchers import METRICS

pytestmark = pytest.mark.slurm

# Long enough training (about 15 s for AR on 2 busy cores) to requeue the job in the middle of it.
POINTS = ["-m", "prior=ar,absorbing", "T=2", "experiment=smoke", "logger=none", "train.steps=300",
          "train.val_every=25", "train.ckpt_every=50"]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=2",
         "hydra.launcher.timeout_min=10"]
TRAINING = re.compile(r"ar:model step \d+/300: val")


def skip_or_fail(problem: str) -> None:
    message = f"{problem}; bring a cluster up with: sudo bash .ci/slurm-up"
    if os.environ.get("PRIORBENCH_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")  # before the session's smoke cache is built: a skip costs no work
def cluster():
    """The partition `debug` is up, or the test is skipped (failed where a cluster is required)."""
    problem = None
    if shutil.which("sinfo") is None:
        problem = "no SLURM client (sinfo not found)"
    else:
        try:  # sinfo tries an unreachable controller for about 10 s
            p = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a %D"], capture_output=True, text=True,
                               timeout=5)
            if p.returncode != 0 or not p.stdout.startswith("up"):
                problem = f"no SLURM partition debug up (sinfo: {(p.stdout + p.stderr).strip() or 'nothing'})"
        except subprocess.TimeoutExpired:
            problem = "no SLURM controller answered sinfo within 5 s"
    if problem:
        skip_or_fail(problem)


def start_sweep(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    out = cwd / f"sweep-{len(list(cwd.glob('sweep-*.log')))}.log"
    with out.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(RUN), *args], cwd=cwd, env=cli_env(), stdout=f,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    return proc, out


def wait_for_log(sweep_dir: Path, pattern: re.Pattern, proc: subprocess.Popen, timeout: float = 300) -> str:
    """The SLURM id of the job whose submitit log matches `pattern` (array tasks' folders are named by id)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the sweep ended before the job got there"
        for f in sweep_dir.glob(".submitit/*/*_log.*"):
            if pattern.search(f.read_text(errors="replace")):
                return f.parent.name
        time.sleep(0.5)
    raise AssertionError(f"no job log matched {pattern.pattern} within {timeout}s")


def trained_weights(cache: Path) -> dict[str, dict]:
    return {d.name: torch.load(d / "model.pt", weights_only=True) for d in cache.glob("train/*")
            if d.is_dir() and not d.name.endswith(".work") and not d.name.startswith(".")}


def test_requeued_job_resumes_and_the_sweep_equals_the_basic_launcher(cluster, copy_token_cache, tmp_path):
    basic_cache, slurm_cache = copy_token_cache(tmp_path / "c_basic"), copy_token_cache(tmp_path / "c_slurm")
    p = run_cli(POINTS + ["name=basic", f"paths.cache={basic_cache}"], cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    proc, out = start_sweep(POINTS + ["name=slurm", f"paths.cache={slurm_cache}", *SLURM], tmp_path)
    try:
        job = wait_for_log(tmp_path / "multirun" / "slurm", TRAINING, proc)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "--name=run"], timeout=30)
    assert proc.returncode == 0, out.read_text()[-4000:]
    assert (tmp_path / "reports" / "slurm" / "report.md").is_file()

    # The requeued job checkpointed on SLURM's SIGTERM in the middle of training and its second run resumed there.
    log = next((tmp_path / "multirun" / "slurm" / ".submitit" / job).glob("*_log.out")).read_text()
    stopped = re.search(r"SIGTERM at step (\d+) of ar:model", log)
    resumed = re.search(r"model: resumed from \S+ at step (\d+)/300", log)
    assert stopped and resumed and stopped.group(1) == resumed.group(1), log[-4000:]
    assert 0 < int(stopped.group(1)) < 300
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in show, show

    basic = {(j["prior"], j["T"]): j for j in job_results(tmp_path / "multirun" / "basic")}
    slurm = {(j["prior"], j["T"]): j for j in job_results(tmp_path / "multirun" / "slurm")}
    assert basic.keys() == slurm.keys() and len(basic) == 2
    for point in basic:
        a, b = basic[point], slurm[point]
        assert a["status"] == b["status"] == "ok" and a["threads"] == b["threads"]
        sa, sb = (np.load(f"{j['eval_dir']}/samples.npz") for j in (a, b))
        for arr in ("tokens", "completions", "images"):
            np.testing.assert_array_equal(sa[arr], sb[arr], err_msg=f"{point} {arr}")
        for m in METRICS:
            assert b[m] == a[m], (point, m)  # same kernels and thread counts: bit-identical (test_launchers.py)
    wa, wb = trained_weights(basic_cache), trained_weights(slurm_cache)
    assert wa.keys() == wb.keys() and len(wa) == 2
    for key in wa:
        assert wa[key]["best_val"] == wb[key]["best_val"]
        assert all(torch.equal(v, wb[key]["state_dict"][k]) for k, v in wa[key]["state_dict"].items()), key


def test_cancelled_job_ends_the_sweep_with_one_line_naming_it(cluster, copy_token_cache, tmp_path):
    cache = copy_token_cache(tmp_path / "cache")
    args = ["-m", "prior=ar", "T=2", "experiment=smoke", "logger=none", "train.steps=300", "train.val_every=25",
            "name=lost", f"paths.cache={cache}", *SLURM, "hydra.launcher.lost_job_timeout_s=10",
            "hydra.launcher.poll_s=2"]
    proc, out = start_sweep(args, tmp_path)
    try:
        job = wait_for_log(tmp_path / "multirun" / "lost", TRAINING, proc)
        subprocess.run(["scancel", job], check=True, timeout=30)
        t0 = time.time()
        proc.wait(timeout=300)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "--name=run"], timeout=30)
    text = out.read_text()
    assert proc.returncode == 1, text[-3000:]
    [line] = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert f"SLURM job {job} (prior=ar T=2 " in line and "left the queue without a result" in line, line
    assert waited < 240, waited


def test_an_unreachable_controller_ends_the_wait_with_one_line(tmp_path, monkeypatch, capsys):
    # The real squeue against a controller that is not there: nothing tells a lost job from a running one, so the
    # wait is bounded by lost_job_timeout_s here too (squeue itself tries the controller for about 10 s a call).
    if shutil.which("squeue") is None:
        skip_or_fail("no SLURM client (squeue not found)")
    import submitit
    from hydra_plugins.priorbench_slurm.slurm_launcher import SlurmLauncher

    (tmp_path / "slurm.conf").write_text("ClusterName=gone\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
                                         "NodeName=gone CPUs=1\nPartitionName=p Nodes=gone\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    jobs = [submitit.SlurmJob(tmp_path / "%j", job_id) for job_id in ("41_0", "41_1")]
    launcher = SlurmLauncher(lost_job_timeout_s=1, poll_s=1)
    with pytest.raises(SystemExit) as e:
        launcher.wait(jobs)
    assert e.value.code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: squeue has failed for 1s (") and "Unable to contact slurm controller" in line
    assert line.endswith("SLURM jobs without a result: 41_0, 41_1"), line
