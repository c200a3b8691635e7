import os

# OpenMP threads that spin-wait for busy cores make small CPU ops orders of magnitude slower on a shared
# 2-core machine; passive waiting costs nothing when the cores are free. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_STAGES = ("data", "tokenizer", "tokens", "reference", "baselines")


@pytest.fixture(scope="session")
def smoke_tokens_run(tmp_path_factory):
    """The smoke preset's shared stages, built once per test session by the real CLI from an empty cache:
    (its folder, the finished process). The job's outputs are under folder/outputs, its cache folder/cache;
    tests read the cache or copy it, never change it."""
    from tests.clitools import run_cli

    root = tmp_path_factory.mktemp("smoke_tokens")
    p = run_cli(["experiment=smoke", "logger=none", "stage=tokens", f"paths.cache={root / 'cache'}"], cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return root, p


@pytest.fixture(scope="session")
def smoke_token_cache(smoke_tokens_run):
    """The cache of the smoke preset's shared stages (smoke_tokens_run)."""
    return smoke_tokens_run[0] / "cache"


def copy_shared_stages(cache: Path, dest: Path) -> Path:
    """dest: a new cache holding copies of the shared stages of `cache`."""
    for stage in SHARED_STAGES:
        shutil.copytree(cache / stage, dest / stage)
    return dest


@pytest.fixture
def copy_token_cache(smoke_token_cache):
    """A fresh cache holding copies of the shared smoke stages: only the test's own stages get computed."""
    return lambda dest: copy_shared_stages(smoke_token_cache, dest)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread mostly waits on the first (10-100x slower
    per call). Modules that use it run on one thread; the previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMOKE_SWEEP = ["-m", "prior=ar,imagebart,absorbing", "T=2,3,5,9", "experiment=smoke"]


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """The user's sweep on the smoke preset (12 jobs, W&B offline) from an empty cache, run once per session:
    (its folder, the finished process). Sweep folder folder/multirun/smoke, report folder/reports/smoke, cache
    folder/cache. tests/test_sweep.py checks it; other modules compare against its jobs or copy its cache."""
    from tests.clitools import run_cli

    root = tmp_path_factory.mktemp("sweep")
    p = run_cli(SMOKE_SWEEP + ["name=smoke", f"paths.cache={root / 'cache'}"], cwd=root, timeout=1200)
    return root, p
