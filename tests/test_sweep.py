"""The user's sweep end to end on the smoke preset: 12 jobs, shared stages, the report, and a rerun that trains nothing."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from bench.keys import SCHEMA
from bench.results import load_results
from tests import wandbtools as W

from tests.clitools import ROOT, job_results, run_cli
from tests.conftest import SMOKE_SWEEP

SWEEP = SMOKE_SWEEP


@pytest.fixture
def sweep(smoke_sweep):
    """The session's smoke sweep (tests/conftest.py), shared with tests/test_launchers.py."""
    return smoke_sweep


def test_sweep_runs_twelve_jobs_and_shares_work(sweep):
    root, p = sweep
    assert p.returncode == 0, p.stderr[-4000:]
    log = p.stdout + p.stderr
    # Logs that read well in a file: no progress-bar frames piled into one line, one line per finished job.
    assert max(len(ln) for ln in (p.stdout + p.stderr).splitlines()) <= 1000
    assert log.count("job done: prior=") == 12 and "results=" in log
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
    [table] = report_run.glob("files/media/table/comparison_*.table.json")
    assert "fid_ci_lo" in table.read_text()  # the comparison table carries the intervals


def test_sweep_writes_the_report(sweep):
    root, p = sweep
    out = root / "reports" / "smoke"
    md = (out / "report.md").read_text()
    for label in ("AR (Taming)", "ImageBART", "Absorbing (Unleashing)"):
        assert label in md
    main = md.split("## Main results")[1].split("\n## ")[0]
    table = [ln for ln in main.splitlines() if ln.startswith("| ImageBART |")]
    assert [ln.split("|")[2].strip() for ln in table] == ["2", "3", "5", "9"]
    assert len([ln for ln in main.splitlines() if ln.startswith("| AR (Taming) (ref.) |")]) == 1
    # Baseline rows at the columns' N, intervals, N per column, and the tests against the AR row in words.
    assert "| *real val images* |" in main and "| *tokenizer reconstructions* |" in main
    assert re.search(r"\| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]", main)
    assert "N per column: FID, KID, IS and PRDC at N = 16 samples" in main and "completion FID at N = 8" in main
    assert "Holm" in main and "A/A check: ImageBART T=2 is the same model as the AR (Taming) row" in main
    # Closeness to the training set: a column with the baseline rows' level, and the copies in words.
    head = [c.strip() for c in main.splitlines()[2].split("|")]
    col = head.index("Train match")
    real = [c.strip() for c in next(ln for ln in main.splitlines() if ln.startswith("| *real val images*")).split("|")]
    assert re.fullmatch(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]", real[col]), real[col]
    assert "Train match: per sample, the largest share of token positions" in main and "Exact copies" in main
    for fig in ("fid_vs_T", "fid_vs_speed", "nll_vs_T", "completion_fid_vs_T"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
        assert (out / "figures" / f"{fig}.pdf").stat().st_size > 1000
        assert f"figures/{fig}.png" in md
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 12 and {"fid", "fid_ci", "cfg.train.steps", "override.prior"} <= set(csv.columns)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 9 and {"fid_ci_lo", "fid_p", "fid_significant", "n_seeds"} <= set(summary.columns)
    tex = (out / "table.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{" in tex and tex.count("\\\\") == 10
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
    assert all(len(r) == 7 and r[6] != "n/a |" for r in rows)  # summed and wall minutes
    # The wall time of one unit trained in the job's own process covers that unit's training time.
    res = pd.read_csv(out / "results.csv")
    ar = res[res["prior"] == "ar"].iloc[0]
    assert ar["train_wall_seconds"] >= ar["train_seconds"] > 0
    assert res.loc[res["status"] == "ok", "train_wall_seconds"].gt(0).all()


def test_report_cli_rebuilds_without_torch(sweep, tmp_path):
    root, _ = sweep
    # torch cannot be imported at all (a finder that refuses it), as on a laptop without it.
    script = ("import sys, runpy, importlib.abc\n"
              "class NoTorch(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path, target=None):\n"
              "        if name == 'torch' or name.startswith('torch.'):\n"
              "            raise ImportError('torch is blocked')\n"
              "sys.meta_path.insert(0, NoTorch())\n"
              "sys.argv = ['report.py', *sys.argv[1:]]\n"
              f"runpy.run_path({str(ROOT / 'bench' / 'report.py')!r}, run_name='__main__')\n"
              "assert 'torch' not in sys.modules\n")
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


def test_load_results_is_one_row_per_job_with_every_key_and_override(sweep):
    root, _ = sweep
    df = load_results(root / "multirun" / "smoke")
    assert len(df) == 12 and not df["stale"].any()
    assert set(SCHEMA) <= set(df.columns)
    assert {"override.prior", "override.T", "override.experiment", "cfg.train.steps", "job_dir", "sweep"} <= set(df.columns)
    # AR's T does not apply: its four jobs are one point; every other (prior, T) is its own point.
    assert df["point"].nunique() == 9
    assert df[df["prior"] == "ar"]["point"].nunique() == 1


def test_wandb_runs_have_unit_step_axes_best_validation_tags_and_stable_ids(sweep):
    root, _ = sweep
    [job] = [j for j in job_results(root / "multirun" / "smoke") if j["prior"] == "imagebart" and j["T"] == 3]
    [run] = (Path(job["job_dir"]) / "wandb").glob("offline-run-*")
    recs = W.records(W.run_file(run))
    steps = {m.glob_name: m.step_metric for m in W.metrics(recs) if m.glob_name}
    assert steps["train/scale2/*"] == "scale2/step" and steps["val/scale3/*"] == "scale3/step"
    # Each scale's curve starts at its own step 1, not where the previous scale stopped.
    hist = W.history(recs)
    assert [h["scale3/step"] for h in hist if "train/scale3/loss" in h][0] == 1
    summary = W.summary(recs)
    best = min(h["val/scale2/bits_per_token"] for h in hist if "val/scale2/bits_per_token" in h)
    # The same float logged twice and read back: equal, or one float32 store apart (eps 1.2e-7), inside
    # pytest.approx's relative 1e-6.
    assert summary["best_val/scale2/bits_per_token"] == pytest.approx(best)
    assert summary["val/scale2/bits_per_token"] == {"min": pytest.approx(best)}
    assert summary["eval/fid"] == pytest.approx(job["fid"]) and "eval/fid" not in {k for h in hist for k in h}
    rr = W.run_record(recs)
    assert {"prior=imagebart", "T=3", "seed=0", "sweep=smoke"} <= set(rr.tags)
    assert rr.run_id.startswith("pb-")
    # The sweep's report run is tagged with its sweep only: it is no (prior, T, seed) point.
    [report_run] = (root / "multirun" / "smoke" / "wandb").glob("offline-run-*")
    report = W.run_record(W.records(W.run_file(report_run)))
    assert set(report.tags) == {"sweep=smoke"}


def test_rerun_of_a_job_resumes_its_wandb_run(sweep, tmp_path):
    root, _ = sweep
    args = ["experiment=smoke", "prior=ar", "name=resume", f"paths.cache={root / 'cache'}",
            f"hydra.run.dir={tmp_path / 'job'}"]
    for _ in range(2):
        p = run_cli(args, cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert len({W.run_record(W.records(W.run_file(r))).run_id for r in runs}) == 1


def test_ablations_stay_apart_and_a_reused_name_ignores_old_folders(sweep, tmp_path):
    root, _ = sweep
    common = ["-m", "experiment=smoke", "prior=ar", "logger=none", "name=abl", f"paths.cache={root / 'cache'}"]
    p = run_cli(common + ["prior.sample.temperature=0.8,1.0"], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    df = load_results(tmp_path / "multirun" / "abl")
    assert len(df) == 2 and df["point"].nunique() == 2
    main = (tmp_path / "reports" / "abl" / "report.md").read_text().split("## Main results")[1].split("\n## ")[0]
    rows = [ln for ln in main.splitlines() if ln.startswith("| AR (Taming)")]
    assert len(rows) == 2 and all("| 1 |" in r for r in rows)  # one seed each, not one row of "2 seeds"
    assert "prior.sample.temperature" in next(ln for ln in main.splitlines() if ln.startswith("| Prior"))

    # The same name with a smaller grid: the old job folders stay on disk but are not counted.
    p = run_cli(common + ["prior.sample.temperature=0.9"], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    df = load_results(tmp_path / "multirun" / "abl")
    assert len(df) == 1 and df.iloc[0]["override.prior.sample.temperature"] == "0.9"
    assert len(load_results(tmp_path / "multirun" / "abl", include_stale=True)) == 2  # job 0 was overwritten
    md = (tmp_path / "reports" / "abl" / "report.md").read_text()
    assert "1 stale job folder(s) of an earlier launch" in md


def test_a_fourth_prior_runs_without_touching_bench(sweep, tmp_path):
    """A prior defined in the test suite (tests/toy_prior.py, tests/conf/prior/toy.yaml) runs a smoke sweep next
    to AR and gets its own row: the harness uses the prior's declarations, never its name."""
    root, _ = sweep
    conf = Path(__file__).resolve().parent / "conf"
    p = run_cli(["-m", "prior=ar,toy", "T=2,3", "experiment=smoke", "logger=none", "name=toy",
                 f"hydra.searchpath=[file://{conf}]", f"paths.cache={root / 'cache'}"], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = job_results(tmp_path / "multirun" / "toy")
    assert len(jobs) == 4 and all(j["status"] == "ok" for j in jobs)
    toy = [j for j in jobs if j["prior"] == "toy"]
    assert {j["T_applies"] for j in toy} == {"none"} and len({j["eval_dir"] for j in toy}) == 1
    assert toy[0]["nll_kind"] == "exact" and toy[0]["fid"] > 0
    main = (tmp_path / "reports" / "toy" / "report.md").read_text().split("## Main results")[1].split("\n## ")[0]
    assert len([ln for ln in main.splitlines() if ln.startswith("| toy |")]) == 1
    bench = Path(__file__).resolve().parent.parent / "bench"
    assert not any("toy" in f.read_text() for f in bench.glob("*.py"))
