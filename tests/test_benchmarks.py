"""The GPU check script runs end to end (in its --quick shapes, on the CPU) and writes what it reports."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.clitools import ROOT, cli_env


def test_gpu_check_quick_writes_every_point(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu",
                        "--priors", "ar", "imagebart", "absorbing", "--T", "3", "5", "--out", str(tmp_path)],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["quick"] and report["env"]["precision"] == "bf16"
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
    # Training is timed once per trained model: ImageBART's first (encoder-decoder) and last (decoder-only) scale.
    assert [t["unit"] for t in points[("imagebart", 5)]["train"]] == ["scale2", "scale5"]
    assert [t["unit"] for t in points[("ar", None)]["train"]] == ["model"]
    assert "train" in points[("absorbing", 3)] and "train" not in points[("absorbing", 5)]
    assert all(t["loss_finite"] and t["tokens_per_second"] > 0 for r in points.values() for t in r.get("train", []))
    assert "| imagebart | 5 |" in p.stdout
