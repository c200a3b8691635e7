"""The GPU check script runs end to end (in its --quick shapes, on the CPU) and writes what it reports."""
from __future__ import annotations

import json

import pytest

from tests.clitools import ROOT, run_cli


# Slow (12 s): the GPU check's quick CPU pass; the sampling benchmark's tests below run by default.
@pytest.mark.slow
def test_gpu_check_quick_writes_every_point(tmp_path):
    p = run_cli(["--quick", "--device", "cpu", "--priors", "ar", "imagebart", "absorbing", "--T", "3", "5",
                 "--out", str(tmp_path), "--compile-backend", "eager"],
                cwd=tmp_path, timeout=300, script=ROOT / "benchmarks" / "gpu_check.py")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["quick"] and report["env"]["precision"] == "bf16"
    assert report["env"]["matmul_peak_flop_per_s"] > 1e8 and report["env"]["compile_backend"] == "eager"
    points = {(r["prior"], r["T"]): r for r in report["points"]}
    assert list(points) == [("ar", None), ("imagebart", 3), ("imagebart", 5), ("absorbing", 3), ("absorbing", 5)]
    budget = report["env"]["budget"]
    for (prior, T), r in points.items():
        assert "error" not in r, r
        assert abs(r["params"] - budget) <= 0.1 * budget
        s = r["sample"]
        assert s["tokens_in_range"] and s["seconds_per_image"] > 0 and s["batch"] == 4
        expected_nfe = {"ar": 64, "absorbing": T}[prior] if prior != "imagebart" else (T - 1) * 64 + (T - 2)
        assert s["nfe"] == expected_nfe
        # The compiled path (here dynamo's capture only) and the efficiency figure of both paths.
        c = r["sample_compiled"]
        assert c["compile"] == "on" and c["tokens_in_range"] and c["seconds_per_image"] > 0 and c["nfe"] == s["nfe"]
        assert c["warmup_seconds"] > 0 and 0.5 <= c["same_tokens_fraction"] <= 1
        for path in (s, c):
            assert path["flops_per_image"] > 0 and path["share_of_peak"] > 0
            # One or two float64 roundings on either side: pytest.approx's relative 1e-6 is 1e9 ulps.
            assert path["flop_per_s"] == pytest.approx(path["flops_per_image"] / path["seconds_per_image"])
    # Training is timed once per trained model: ImageBART's first (encoder-decoder) and last (decoder-only) scale.
    assert [t["unit"] for t in points[("imagebart", 5)]["train"]] == ["scale2", "scale5"]
    assert [t["unit"] for t in points[("ar", None)]["train"]] == ["model"]
    assert "train" in points[("absorbing", 3)] and "train" not in points[("absorbing", 5)]
    assert all(t["loss_finite"] and t["tokens_per_second"] > 0 for r in points.values() for t in r.get("train", []))
    assert "| imagebart | 5 |" in p.stdout


def test_sampling_speed_reports_every_path_with_the_same_tokens(tmp_path):
    """benchmarks/sampling_speed.py at the default shapes, one round, compiled path through dynamo's capture."""
    out = tmp_path / "speed.json"
    p = run_cli(["--shapes", "default", "--repeats", "1", "--threads", "1", "--peak-seconds", "0.1",
                 "--compile-backend", "eager", "--json", str(out)],
                cwd=tmp_path, timeout=300, script=ROOT / "benchmarks" / "sampling_speed.py")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    # The shares use the better of the peaks (and bandwidths) measured at the start and at the end.
    assert report["peak_flop_per_s"] == max(report["measured"]["peak_flop_per_s"])
    assert report["read_bytes_per_s"] == max(report["measured"]["read_bytes_per_s"])
    got = {(r["sampler"].split()[0], r["path"]) for r in rows}
    assert got == {(s, path) for s in ("ar", "imagebart") for path in ("uncached", "eager", "aten", "compiled")} | {
        ("absorbing", "eager"), ("absorbing", "aten"), ("absorbing", "compiled")}
    assert "fused CPU code: " in p.stdout and "-float vectors" in p.stdout  # the eager path ran the fused code
    for r in rows:
        assert r["same_tokens"] and r["batch"] == 50 and r["threads"] == 1
        assert r["flop_per_s"] == pytest.approx(r["flops_per_image"] * 50 / r["seconds"])  # a few roundings
        assert r["share_of_peak"] == pytest.approx(r["flop_per_s"] / report["peak_flop_per_s"])
        assert 0 < r["share_of_peak"] and (r["compile_seconds"] is not None) == (r["path"] == "compiled")
        if r["path"] != "uncached" and not r["sampler"].startswith("absorbing"):
            assert r["speedup_vs_uncached"] > 1  # the cache saves the prefix recomputation
        # The roofline: the slower of the compute and the bandwidth bound, never below the compute bound alone.
        # (equal when compute-bound, up to the two routes' four float64 roundings of 2^-53 each)
        assert r["bytes_per_image"] > 0 and r["share_of_roofline"] >= r["share_of_peak"] * (1 - 4 * 2.0 ** -53)
        assert r["share_of_roofline"] == pytest.approx(r["roofline_seconds"] / r["seconds"])


def test_sampling_speed_profile_prints_the_operators_of_a_step(tmp_path):
    """--profile: per cached path, the operators of one network call with their calls, time and bytes read (the
    aten path: the fused code of the eager one runs outside ATen's operators)."""
    p = run_cli(["--shapes", "default", "--priors", "ar", "--paths", "aten", "--repeats", "1", "--threads", "1",
                 "--peak-seconds", "0.1", "--bandwidth-seconds", "0.1", "--profile", "--profile-rows", "5"],
                cwd=tmp_path, timeout=300, script=ROOT / "benchmarks" / "sampling_speed.py")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = p.stdout
    assert "profile of ar, aten, per network call (64 per run, batch 50)" in out and "read bandwidth" in out
    table = out[out.index("profile of ar"):].splitlines()[2:8]  # five operators, then the rest summed
    assert len(table) == 6 and table[-1].split()[1] == "other"
    # Every cached step runs the four projections of each of the 4 layers: 16 addmm per network call.
    addmm = [line.split() for line in table if line.split()[0] == "aten::addmm"]
    assert addmm and float(addmm[0][1]) == 16.0
