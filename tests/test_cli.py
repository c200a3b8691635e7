"""End-to-end runs of bench/run.py on the smoke preset, and its one-line errors for bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.keys import INTERVAL_KEYS, SCHEMA
from tests.clitools import job_results, popen_cli, run_cli
from tests.conftest import copy_shared_stages

SMOKE = ["experiment=smoke", "logger=none"]


@pytest.fixture(scope="module")
def shared_cache(smoke_token_cache, tmp_path_factory):
    """One cache for this module, starting from copies of the session's shared smoke stages."""
    return copy_shared_stages(smoke_token_cache, tmp_path_factory.mktemp("shared") / "cache")


def test_tokens_stage_builds_then_reuses(smoke_tokens_run, tmp_path):
    # The first run: the session's build of the shared stages from an empty cache, the same command line.
    root, first = smoke_tokens_run
    cache = root / "cache"
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert "training a VQGAN" in log
    assert re.search(r"K_eff=\d+ of 64 codes \(usage [\d.]+%, perplexity [\d.]+\), grid 8x8, val PSNR [\d.]+ dB", log)
    [r] = job_results(root / "outputs")
    assert r["status"] == "ok" and r["fid"] is None and r["tokens_key"]
    tok = r["tokenizer"]
    assert 1 < tok["vocab_size"] <= 64 and tok["grid"] == [8, 8] and tok["recon_psnr"] > 5
    assert tok["recon_fid"] is not None and tok["recon_fid"] > 0 and tok["recon_fid_n"] == 16
    # The baseline rows, at the columns' N: real val images beat their reconstructions.
    base = r["baselines"]
    assert base["n_samples"] == 16 and base["n_completions"] == 8
    for row in ("real_val", "reconstruction"):
        for key in ("fid", "kid_mean", "prdc_precision", "coverage", "completion_fid"):
            lo, hi = base[row][f"{key}_ci"]
            assert lo <= base[row][key] <= hi, (row, key)  # clipped to the metric's range (coverage <= 1)
        lo, hi = base[row]["fid_ci"]
        assert lo < base[row]["fid"] < hi
    # Both rows decode the val images' codes: one closeness to the training grids, a share of positions.
    assert base["real_val"]["train_match"] == base["reconstruction"]["train_match"]
    assert 0 < base["real_val"]["train_match"] < 1 and base["real_val"]["n_match_samples"] == 16
    assert base["real_val"]["fid"] < base["reconstruction"]["fid"]

    second = run_cli(SMOKE + ["stage=tokens", f"paths.cache={cache}"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log2 = second.stdout + second.stderr
    assert "training a VQGAN" not in log2
    for stage in ("data", "tokenizer", "tokens", "reference features", "baselines"):
        assert f"{stage}: reusing cache" in log2
    assert "plan: tokens    cached" in log2 and "plan: tokens    runs" in log


def test_baselines_beyond_the_val_split_are_unavailable_with_the_reason(shared_cache, tmp_path):
    p = run_cli(SMOKE + ["stage=tokens", "eval.num_samples=1000", f"paths.cache={shared_cache}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    [r] = job_results(tmp_path / "outputs")
    base = r["baselines"]
    sample_keys = {"fid", "kid_mean", "is_mean", "prdc_precision", "recall", "density", "coverage", "train_match",
                   "train_copies"}
    assert sample_keys <= set(base["unavailable"])
    assert all(re.fullmatch(r"the val split has \d+ images, fewer than eval.num_samples=1000", base["unavailable"][k])
               for k in sample_keys)
    for row in ("real_val", "reconstruction"):
        assert not sample_keys & set(base[row]) and base[row]["completion_fid"] > 0  # completion has its own N


# Slow (20 s): the default run's smoke jobs train on unmirrored tokens; this checks the hflip_train option only.
@pytest.mark.slow
def test_mirrored_train_tokens_are_the_mirrored_images_codes(shared_cache, tmp_path):
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from bench.tokens import encode_images, job_tokenizer, load_tokenizer

    sets = {}
    for flip in (True, False):
        out = tmp_path / str(flip)
        p = run_cli(SMOKE + ["stage=tokens", f"tokenizer.hflip_train={str(flip).lower()}",
                             f"paths.cache={shared_cache}", f"hydra.run.dir={out}"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        [r] = job_results(out)
        blob = torch.load(shared_cache / "tokens" / r["tokens_key"] / "tokens.pt", weights_only=True)
        sets[flip] = (r, {k: blob["inverse"][blob[k]] for k in ("train", "val")})  # original codebook ids
    assert sets[True][0]["tokens_key"] != sets[False][0]["tokens_key"]
    assert "training a VQGAN" not in p.stdout + p.stderr  # the option never retrains the tokenizer
    [data_dir] = [d for d in (shared_cache / "data").iterdir() if d.is_dir()]
    images = np.load(data_dir / "train.npy")
    [tok_dir] = [d for d in (shared_cache / "tokenizer").iterdir() if d.is_dir()]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        tokenizer, _ = job_tokenizer(compose("config", overrides=["experiment=smoke"]))
    model = load_tokenizer(tok_dir, tokenizer)
    plain, mirrored = (encode_images(model, x, 64, "test") for x in (images, images[..., ::-1].copy()))
    n = len(images)
    flipped, unflipped = sets[True][1], sets[False][1]
    assert len(unflipped["train"]) == n and torch.equal(unflipped["train"], plain)
    assert len(flipped["train"]) == 2 * n
    assert torch.equal(flipped["train"][:n], plain) and torch.equal(flipped["train"][n:], mirrored)
    assert not torch.equal(plain, mirrored)
    assert torch.equal(flipped["val"], unflipped["val"])  # validation is never mirrored


def test_two_processes_on_an_empty_cache_train_the_tokenizer_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [popen_cli(SMOKE + ["stage=tokens", f"paths.cache={cache}", f"hydra.run.dir=out{i}"], cwd=tmp_path)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert sum(o.count("training a VQGAN") for o in outs) == 1
    assert sum("built by a parallel job" in o for o in outs) >= 1
    keys = {json.loads((tmp_path / f"out{i}" / "results.json").read_text())["tokens_key"] for i in range(2)}
    assert len(keys) == 1


@pytest.mark.parametrize("prior", ["ar", "imagebart", "absorbing"])
def test_one_job_writes_complete_results(shared_cache, tmp_path, prior):
    p = run_cli(SMOKE + [f"prior={prior}", "T=3", f"paths.cache={shared_cache}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    [r] = job_results(tmp_path / "outputs")
    assert {k.name for k in SCHEMA} <= set(r)
    assert r["status"] == "ok" and r["error"] is None
    assert r["prior"] == prior and r["T"] == 3 and r["train_steps"] == 30
    for key in ("fid", "kid_mean", "prdc_precision", "recall", "density", "coverage", "completion_fid",
                "nll_bits_per_token", "sample_seconds_per_image", "samples_per_second", "params", "nfe",
                "peak_memory_mb", "threads"):
        assert isinstance(r[key], (int, float)), key
    for key in ("fid", "kid_mean", "prdc_precision", "recall", "density", "coverage", "completion_fid",
                "nll_bits_per_token"):
        assert key in INTERVAL_KEYS
        lo, hi = r[f"{key}_ci"]
        assert lo <= r[key] <= hi and r[f"{key}_se"] >= 0, key
    assert r["n_samples"] == 16 and r["n_completions"] == 8 and r["n_bootstrap"] >= 200
    assert r["is_mean"] is None and "logits" in r["unavailable"]["is_mean"]
    assert r["nll_kind"] == {"ar": "exact", "imagebart": "elbo", "absorbing": "order_bound"}[prior]
    assert r["nll_sequences"] > 1 and r["nll_stderr"] > 0
    assert r["nfe"] == {"ar": 64, "imagebart": 2 * 64 + 1, "absorbing": 3}[prior]
    assert abs(r["params"] - 150000) <= 15000
    job = tmp_path / "outputs"
    assert list(job.rglob("samples_grid.png")) and list(job.rglob("completion_grid.png"))
    assert not list(job.rglob("wandb"))


# Slow (38 s): bf16 training and sampling under CPU autocast also run by default in tests/test_memory.py; this adds
# the CLI run and its own cache keys.
@pytest.mark.slow
def test_bf16_runs_on_cpu_under_its_own_cache_keys(shared_cache, tmp_path):
    """precision=bf16 autocasts training, sampling and completion (also on CPU, where auto means fp32); its
    checkpoints and samples get their own cache keys, while fp32 and auto on CPU share theirs."""
    runs = {}
    for precision in ("bf16", "fp32", "auto"):
        out = tmp_path / precision
        p = run_cli(SMOKE + ["prior=imagebart", "T=3", f"precision={precision}", f"paths.cache={shared_cache}",
                             f"hydra.run.dir={out}"] + (["stage=train"] if precision != "bf16" else []), cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        [runs[precision]] = job_results(out)
    bf16 = runs["bf16"]
    assert bf16["status"] == "ok" and bf16["compute_precision"] == "bf16"
    assert isinstance(bf16["fid"], float) and isinstance(bf16["completion_fid"], float)
    assert bf16["nll_kind"] == "elbo" and 0 < bf16["nll_bits_per_token"] < 20
    assert runs["fp32"]["compute_precision"] == runs["auto"]["compute_precision"] == "fp32"
    assert runs["fp32"]["train_key"] == runs["auto"]["train_key"] != bf16["train_key"]


def _run_module():
    import importlib.util

    from tests.clitools import RUN

    spec = importlib.util.spec_from_file_location("bench_run_cli", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_name_is_pinned_once_for_multi_process_launchers():
    """The pinned name joins the user's overrides wherever they are; the user's arguments stay as typed."""
    run = _run_module()
    stamp = r"name=\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"
    argv = run.pin_sweep_name(["-m", "prior=ar", "T=2,3"])
    assert argv[0] == "-m" and re.fullmatch(stamp, argv[1]) and argv[2:] == ["prior=ar", "T=2,3"]
    argv = run.pin_sweep_name(["prior=ar,absorbing", "experiment=smoke", "-m"])  # -m after the overrides
    assert re.fullmatch(stamp, argv[0]) and argv[1:] == ["prior=ar,absorbing", "experiment=smoke", "-m"]
    argv = run.pin_sweep_name(["--config-name", "config", "-m"])  # no override: a flag's value stays its own
    assert re.fullmatch(stamp, argv[0]) and argv[1:] == ["--config-name", "config", "-m"]
    assert run.pin_sweep_name(["-m", "name=mine"]) == ["-m", "name=mine"]
    assert run.pin_sweep_name(["prior=ar"]) == ["prior=ar"]  # single runs have no sweep folder
    assert run.pin_sweep_name(["a=1", "-m", "b=2"]) == ["a=1", "-m", "b=2"]  # Hydra's own usage error, untouched


def test_group_choices_are_checked_per_sweep_value():
    run = _run_module()
    assert run.check_group_choices(["prior=ar,imagebart", "T=2"]) is None
    assert run.check_group_choices(["-m", "prior=ar,imagebrat"]) == \
        "prior=imagebrat is not one of: absorbing, ar, imagebart"
    assert run.check_group_choices(["hydra/launcher=joblib", "experiment=smoke"]) is None
    # Hydra's own sweep syntax is expanded by Hydra's parser, not refused.
    assert run.check_group_choices(["-m", "prior=glob(*)"]) is None
    assert run.check_group_choices(["-m", "prior=choice(ar,imagebart)"]) is None
    assert run.check_group_choices(["-m", "prior=glob(nosuch*)"]).startswith("prior=glob(nosuch*) matches none of")


def test_hydra_sweep_syntax_runs(tmp_path, smoke_token_cache):
    # -m after the overrides, as Hydra allows, and no name: the sweep gets one pinned name.
    p = run_cli(["prior=glob(*)", "experiment=smoke", "stage=tokens", "logger=none",
                 f"paths.cache={smoke_token_cache}", "-m"], cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    [sweep] = (tmp_path / "multirun").iterdir()
    assert sorted(j["prior"] for j in job_results(sweep)) == ["absorbing", "ar", "imagebart"]
    assert (tmp_path / "reports" / sweep.name / "report.md").is_file()


def test_help_shows_the_usage(tmp_path):
    p = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert p.returncode == 0
    assert "python bench/run.py -m prior=ar,imagebart,absorbing T=2,3,5,9" in p.stdout
    assert "prior: absorbing, ar, imagebart" in p.stdout
