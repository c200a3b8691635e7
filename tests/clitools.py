"""Run the real CLI in a subprocess, the way a user does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 600, script: Path = RUN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def popen_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUN), *args], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)


def job_results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"job_dir": str(p.parent)} for p in sorted(Path(root).rglob("results.json"))
            if "eval" not in p.parts]


def run_cli_many(cases: list[tuple[list[str], Path]], timeout: float = 600) -> list[dict]:
    """Each (command line, working folder) of `cases` through bench/run.py's cli() in one process
    (tests/cli_batch.py): the exit status, stdout and stderr of each, for tables of inputs that must fail
    before any work."""
    cases = [{"argv": list(argv), "cwd": str(cwd)} for argv, cwd in cases]
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch.py")], env=cli_env(),
                       input=json.dumps(cases), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)
