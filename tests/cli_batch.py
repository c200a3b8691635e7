"""Run many command lines of bench/run.py in one process (python tests/cli_batch.py < cases.json).

Each case goes through the same `cli(argv)` as `python bench/run.py ARGS`, with file descriptors 1 and 2
captured, so what it prints and its exit status are what the user sees; only the interpreter, torch and
Hydra start once instead of per case. Reads a JSON list of {"argv", "cwd"};
prints one JSON list of {"rc", "stdout", "stderr"}.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("bench_run_cli", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Hydra finds config_path next to the calling file only for a task function of __main__, as when the file
    # runs as a script; loaded as a module it would look for a package instead.
    module.main.__wrapped__.__module__ = "__main__"
    return module.cli


def run_one(cli, argv: list[str], cwd: str) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    os.chdir(cwd)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            cli(list(argv))
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - an escaped exception is what the user would see as a traceback
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    cli = load_cli()
    results = [run_one(cli, c["argv"], c["cwd"]) for c in cases]
    sys.stdout.write(json.dumps(results))
