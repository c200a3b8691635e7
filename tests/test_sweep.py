"""The user's sweep end to end on the smoke preset: 12 jobs, shared stages, the report, and a rerun that trains nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.clitools import ROOT, job_results, run_cli

SWEEP = ["-m", "prior=ar,imagebart,absorbing", "T=2,3,5,9", "experiment=smoke"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    p = run_cli(SWEEP + ["name=smoke", f"paths.cache={root / 'cache'}"], cwd=root, timeout=1200)
    return root, p


def test_sweep_runs_twelve_jobs_and_shares_work(sweep):
    root, p = sweep
    assert p.returncode == 0, p.stderr[-4000:]
    log = p.stdout + p.stderr
    jobs = job_results(root / "multirun" / "smoke")
    assert len(jobs) == 12
    assert {(j["prior"], j["T"]) for j in jobs} == {(q, t) for q in ("ar", "imagebart", "absorbing") for t in (2, 3, 5, 9)}
    assert all(j["status"] == "ok" for j in jobs), [j["error"] for j in jobs]
    # Shared stages are built once: one tokenizer, one token set, one reference.
    assert log.count("training a VQGAN") == 1
    assert len({j["tokens_key"] for j in jobs}) == 1
    # AR is trained and evaluated once; absorbing is trained once and evaluated per T; ImageBART trains per T.
    built = [ln for ln in log.splitlines() if "built" in ln and "train " in ln]
    assert sum("train ar:" in ln for ln in built) == 1
    assert sum("train absorbing:" in ln for ln in built) == 1
    assert sum("train imagebart:" in ln for ln in built) == 4
    ar = [j for j in jobs if j["prior"] == "ar"]
    assert len({j["eval_dir"] for j in ar}) == 1 and len({j["fid"] for j in ar}) == 1
    ab = [j for j in jobs if j["prior"] == "absorbing"]
    assert len({j["train_key"] for j in ab}) == 1 and len({j["eval_dir"] for j in ab}) == 4
    assert sorted(j["nfe"] for j in ab) == [2, 3, 5, 9]
    ib = [j for j in jobs if j["prior"] == "imagebart"]
    assert len({j["train_key"] for j in ib}) == 4
    # W&B offline runs: one per job holding its metrics, and the report run holding the comparison table.
    sweep_dir = root / "multirun" / "smoke"
    job_runs = [r for j in jobs for r in (Path(j["job_dir"]) / "wandb").glob("offline-run-*")]
    assert len(job_runs) == 12
    blobs = [next(run.glob("*.wandb")).read_bytes() for run in job_runs]
    assert all(b"eval/fid" in b and b"eval/samples_grid" in b for b in blobs)
    assert sum(b"train/" in b for b in blobs) == 6  # the jobs that trained: AR, absorbing, ImageBART x 4
    [report_run] = (sweep_dir / "wandb").glob("offline-run-*")
    assert b"comparison" in next(report_run.glob("*.wandb")).read_bytes()


def test_sweep_writes_the_report(sweep):
    root, p = sweep
    out = root / "reports" / "smoke"
    md = (out / "report.md").read_text()
    for label in ("AR (Taming)", "ImageBART", "Absorbing (Unleashing)"):
        assert label in md
    main = md.split("## Main results")[1].split("\n## ")[0]
    table = [ln for ln in main.splitlines() if ln.startswith("| ImageBART |")]
    assert [ln.split("|")[2].strip() for ln in table] == ["2", "3", "5", "9"]
    assert len([ln for ln in main.splitlines() if ln.startswith("| AR (Taming) |")]) == 1
    for fig in ("fid_vs_T.png", "fid_vs_speed.png", "nll_vs_T.png", "completion_fid_vs_T.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
        assert f"figures/{fig}" in md
    assert (out / "results.csv").read_text().count("\n") == 13
    assert list((out / "grids").glob("*_samples_grid.png"))
    # Training: one row per training run; ImageBART's per-scale terms add up to the row's sum.
    training = md.split("## Training")[1].split("\n## ")[0]
    rows = [ln.split(" | ") for ln in training.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [(r[0][2:], r[1]) for r in rows] == [("AR (Taming)", "–")] + [("ImageBART", t) for t in "2359"] + \
        [("Absorbing (Unleashing)", "–")]
    t9 = rows[4]
    terms = [float(cell.split()[1]) for cell in t9[3].split("; ")]
    assert [cell.split()[0] for cell in t9[3].split("; ")] == [f"scale{t}" for t in range(2, 10)]
    assert abs(sum(terms) - float(t9[4])) < 5e-3


def test_report_cli_rebuilds_without_torch(sweep, tmp_path):
    root, _ = sweep
    script = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['report.py', *sys.argv[1:]]; "
              f"runpy.run_path({str(ROOT / 'bench' / 'report.py')!r}, run_name='__main__')")
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", script, str(root / "multirun" / "smoke"), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.split("## Main results")[1].split("\n## ")[0].count("| ImageBART |") == 4
    assert md.split("## Training")[1].split("\n## ")[0].count("| ImageBART |") == 4


def test_second_sweep_trains_nothing(sweep):
    root, _ = sweep
    p = run_cli(SWEEP + ["name=smoke2", f"paths.cache={root / 'cache'}", "logger=none"], cwd=root, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    log = p.stdout + p.stderr
    assert "training a VQGAN" not in log
    assert not [ln for ln in log.splitlines() if "built" in ln]
    first = {(j["prior"], j["T"]): j["fid"] for j in job_results(root / "multirun" / "smoke")}
    second = {(j["prior"], j["T"]): j["fid"] for j in job_results(root / "multirun" / "smoke2")}
    assert first == second
    assert not list((root / "multirun" / "smoke2").rglob("wandb"))
