"""priorbench entry point: one Hydra job = one (prior, T, seed) point.

    python bench/run.py                                   # one job on the embedded default
    python bench/run.py -m prior=ar,imagebart,absorbing T=2,3,5,9   # the sweep, then the report
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

# Before torch loads: OpenMP spin-waiting on a busy shared CPU slows small ops by orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import to_absolute_path  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from bench.pipeline import run_job  # noqa: E402
from bench.train import Preempted  # noqa: E402

log = logging.getLogger("priorbench")

EXIT_CONFIG = 2  # bad option or file
EXIT_FAILED = 1  # the job ran and failed
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("prior", "data", "tokenizer", "train", "eval", "logger", "experiment")


def check_group_choices(argv: list[str]) -> str | None:
    """One line for an unknown config-group choice (prior=foo), before Hydra's multi-line composition error."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if key not in GROUPS:
            continue
        choices = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for v in value.split(","):
            v = v.strip()
            if v and v != "null" and v not in choices:
                return f"{key}={v} is not one of: {', '.join(choices)}"
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        # Relative paths mean the directory the user started from, whatever the launcher's cwd is.
        cfg.paths.cache = to_absolute_path(str(cfg.paths.cache))
        cfg.paths.reports = to_absolute_path(str(cfg.paths.reports))
    hc = HydraConfig.get()
    try:
        results = run_job(cfg, Path(hc.runtime.output_dir))
    except Preempted as p:
        print(f"preempted: {p}", file=sys.stderr)
        if callable(p.previous_handler):
            # submitit's handler pickles this job and requeues it on SLURM, then exits.
            p.previous_handler(p.signum, None)
        # The status of a process ended by that signal: SLURM and submitit read it as preemption, not failure.
        sys.exit(128 + p.signum)
    if results["status"] != "ok":
        if results.get("traceback") and (hc.verbose or os.environ.get("PRIORBENCH_TRACEBACK")):
            print(results["traceback"], file=sys.stderr)
        print(f"error: {results['error']}", file=sys.stderr)
        if hc.mode != RunMode.MULTIRUN:
            sys.exit(EXIT_CONFIG if results.get("error_kind") == "config" else EXIT_FAILED)
    return results


def pin_sweep_name(argv: list[str]) -> list[str]:
    """Resolve the default sweep name (a timestamp) once, here: launchers that run jobs in other processes
    (joblib, submitit) would otherwise resolve ${now:...} again in each job and scatter the sweep."""
    flags = [i for i, a in enumerate(argv) if a in ("-m", "--multirun")]
    if not flags or any(a.startswith("name=") for a in argv):
        return argv
    i = flags[0] + 1  # right after the flag, among the overrides, so argparse reads it as one of them
    return argv[:i] + [f"name={datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"] + argv[i:]


if __name__ == "__main__":
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    sys.argv[1:] = pin_sweep_name(sys.argv[1:])
    main()
