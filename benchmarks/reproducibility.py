"""What is bit-reproducible and what agrees only to rounding: one smoke job run under other kernels and threads.

Runs `python bench/run.py experiment=smoke prior=P T=T` (fresh caches, the real CLI) once as the reference and
then under each variation below, and prints, per variation, whether the tokenizer's tokens, the generated
tokens and images are bit-identical to the reference's, and the largest relative difference of any metric:

- again: the same command, the same kernels: everything must be bit-identical;
- threads=1: torch's and the BLAS's thread count (the job's `threads` option);
- kernels: OpenBLAS's generic x86-64 code (OPENBLAS_CORETYPE=Prescott) and ATen's scalar code
  (ATEN_CPU_CAPABILITY=default), as on another CPU;
- kernels, eval only: the same, with the reference run's tokenizer, tokens and trained prior copied in, so that
  only the evaluation (sampling, decoding, Inception features, metrics) runs under the other kernels.

    python benchmarks/reproducibility.py [--prior absorbing] [--T 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("nll_bits_per_token", "fid", "kid_mean", "prdc_precision", "recall", "density", "coverage",
           "completion_fid", "train_match")
SHARED = ("data", "tokenizer", "tokens", "reference", "baselines", "train")
OTHER_KERNELS = {"OPENBLAS_CORETYPE": "Prescott", "ATEN_CPU_CAPABILITY": "default"}


def run(workdir: Path, args: list[str], env: dict[str, str]) -> dict:
    """One job through the real CLI in workdir; its results.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    full = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline", PYTHONPATH=str(ROOT), **env)
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "experiment=smoke", "logger=none",
           f"paths.cache={workdir / 'cache'}", f"hydra.run.dir={workdir / 'run'}", *args]
    p = subprocess.run(cmd, cwd=workdir, env=full, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads((workdir / "run" / "results.json").read_text())


def tokenizer_tokens(workdir: Path) -> bytes:
    [path] = (workdir / "cache" / "tokens").glob("*/tokens.pt")
    return path.read_bytes()


def compare(ref: dict, ref_dir: Path, other: dict, other_dir: Path) -> dict:
    a, b = (np.load(Path(r["eval_dir"]) / "samples.npz") for r in (ref, other))
    rel = {}
    for m in METRICS:
        x, y = ref.get(m), other.get(m)
        if x is not None and y is not None:
            rel[m] = abs(x - y) / max(abs(x), 1e-300)
    worst = max(rel, key=rel.get)
    return {
        "tokenizer tokens identical": tokenizer_tokens(ref_dir) == tokenizer_tokens(other_dir),
        "sample tokens identical": bool(np.array_equal(a["tokens"], b["tokens"])),
        "images identical": bool(np.array_equal(a["images"], b["images"])),
        "largest metric difference": f"{rel[worst]:.1e} ({worst})",
        "relative differences": rel,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="absorbing")
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="priorbench-repro-"))
    job = [f"prior={args.prior}", f"T={args.T}", "threads=2"]
    t0 = time.perf_counter()
    ref = run(root / "reference", job, {})
    variations = {
        "again": (job, {}, False),
        "threads=1": ([*job[:-1], "threads=1"], {}, False),
        "kernels": (job, OTHER_KERNELS, False),
        "kernels, eval only": (job, OTHER_KERNELS, True),
    }
    rows = {}
    for name, (overrides, env, reuse) in variations.items():
        workdir = root / name.replace(" ", "_").replace(",", "").replace("=", "")
        if reuse:
            for stage in SHARED:
                shutil.copytree(root / "reference" / "cache" / stage, workdir / "cache" / stage)
        rows[name] = compare(ref, root / "reference", run(workdir, overrides, env), workdir)
    print(f"# one smoke job (prior={args.prior} T={args.T}) against its reference run; {os.cpu_count()} CPUs, "
          f"{time.perf_counter() - t0:.0f} s")
    cols = ["tokenizer tokens identical", "sample tokens identical", "images identical", "largest metric difference"]
    print("| variation | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
