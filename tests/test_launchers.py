"""Hydra's real launchers give the same results as the basic one, and the sweep lands in one folder.

Every job sets its own intra-op thread count (`threads=auto`: the CPUs the process may use, the same under
every launcher on one machine), so a job computes with the same reduction order whichever launcher runs it.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.clitools import job_results, run_cli

POINTS = ["-m", "prior=ar,absorbing", "T=2,3", "experiment=smoke", "logger=none"]
METRICS = ("fid", "kid_mean", "prdc_precision", "recall", "density", "coverage", "completion_fid",
           "nll_bits_per_token")


def sweep(tmp_path, cache, name, *launcher):
    p = run_cli(POINTS + [f"name={name}", f"paths.cache={cache}", *launcher], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    jobs = job_results(tmp_path / "multirun" / name)
    assert len(jobs) == 4 and all(j["status"] == "ok" for j in jobs)
    assert (tmp_path / "reports" / name / "report.md").is_file()
    return {(j["prior"], j["T"]): j for j in jobs}


@pytest.fixture(scope="module")
def basic(smoke_sweep):
    """The basic launcher's results at POINTS, the reference of every other launcher: the session's smoke sweep
    (tests/conftest.py) runs every one of them with the basic launcher, from the same shared stages."""
    root, p = smoke_sweep
    assert p.returncode == 0, p.stderr[-4000:]
    jobs = {(j["prior"], j["T"]): j for j in job_results(root / "multirun" / "smoke")
            if j["prior"] in ("ar", "absorbing") and j["T"] in (2, 3)}
    assert len(jobs) == 4 and all(j["status"] == "ok" for j in jobs.values())
    return jobs


@pytest.fixture
def copy_sweep_stages(smoke_sweep):
    """A fresh cache holding copies of the smoke sweep's shared stages: the other launcher computes the rest."""
    from tests.conftest import copy_shared_stages

    return lambda dest: copy_shared_stages(smoke_sweep[0] / "cache", dest)


@pytest.mark.parametrize("launcher", [
    pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], id="joblib"),
    # The same check with jobs in submitit's processes; joblib's case runs by default, and tests/test_slurm.py
    # runs submitit's SLURM launcher in CI.
    pytest.param(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], id="submitit_local",
                 marks=pytest.mark.slow)])
def test_parallel_launchers_match_the_basic_launcher(basic, copy_sweep_stages, tmp_path, launcher):
    other = sweep(tmp_path, copy_sweep_stages(tmp_path / "c_other"), "other", *launcher)
    assert basic.keys() == other.keys()
    for point in basic:
        a, b = basic[point], other[point]
        assert a["threads"] == b["threads"]  # what makes the arithmetic the same
        # What must be identical: the generated tokens, completions and images.
        sa, sb = (np.load(f"{j['eval_dir']}/samples.npz") for j in (a, b))
        for arr in ("tokens", "completions", "images"):
            np.testing.assert_array_equal(sa[arr], sb[arr], err_msg=f"{point} {arr}")
        for m in METRICS:
            # The same computation on the same kernel: the job sets torch's and the BLAS's thread counts
            # (bench.device.set_threads), so every reduction runs in the same order and the metrics are equal.
            assert b[m] == a[m], (point, m)
