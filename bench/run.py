"""priorbench entry point: one Hydra job = one point of a sweep (`--help` lists the usage).

    python bench/run.py                                   # one job on the embedded default
    python bench/run.py -m prior=ar,imagebart,absorbing T=2,3,5,9   # the sweep, then the report
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

# Before torch loads: OpenMP spin-waiting on a busy shared CPU slows small ops by orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Progress bars only on a terminal: under SLURM, nohup or CI a bar's carriage-return frames pile up into one
# endless line; there the log's own lines (validation, stage and job lines) report progress.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import to_absolute_path  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from bench import keys as K  # noqa: E402
from bench.errors import EXIT_CONFIG, EXIT_FAILED, Preempted  # noqa: E402
from bench.pipeline import run_job  # noqa: E402
from bench.results import sweep_id  # noqa: E402

log = logging.getLogger("priorbench")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("prior", "data", "tokenizer", "train", "eval", "logger", "experiment")


def group_choices(group: str, extra_dirs: list[Path] = ()) -> list[str]:
    return sorted({p.stem for d in (CONF_DIR, *extra_dirs) for p in (d / group).glob("*.yaml")})


def search_dirs(overrides) -> list[Path]:
    """Config folders added with hydra.searchpath=[file://DIR,...]: their groups' options are choices too."""
    dirs = []
    for o in overrides:
        if o.key_or_group == "hydra.searchpath":
            for entry in o.value() or []:
                if str(entry).startswith("file://"):
                    dirs.append(Path(str(entry)[len("file://"):]))
    return dirs


def check_group_choices(argv: list[str]) -> str | None:
    """One line for an unknown config-group choice (prior=foo), before Hydra's multi-line composition error.

    Overrides are read with Hydra's own parser, so its sweep syntax (a,b / glob(*) / choice(...) / range(...))
    is expanded exactly as Hydra will, and only plain unknown names are refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    args = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return None  # Hydra reports its own syntax errors
    extra = search_dirs(overrides)
    for o in overrides:
        group = o.key_or_group
        if group not in GROUPS or o.is_delete():
            continue
        choices = group_choices(group, extra)
        value = o.value()
        if isinstance(value, Glob):
            if not value.filter(choices):
                return f"{group}={o.input_line.split('=', 1)[1]} matches none of: {', '.join(choices)}"
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [value]
        for v in values:
            if v is not None and str(v) != "null" and str(v) not in choices:
                return f"{group}={v} is not one of: {', '.join(choices)}"
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        # Relative paths mean the directory the user started from, whatever the launcher's cwd is.
        cfg.paths.cache = to_absolute_path(str(cfg.paths.cache))
        cfg.paths.reports = to_absolute_path(str(cfg.paths.reports))
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            # Written by the sweep callback at launch: job folders of earlier launches under this name are stale.
            cfg.sweep_id = sweep_id(Path(to_absolute_path(str(hc.sweep.dir))))
    try:
        results = run_job(cfg, Path(hc.runtime.output_dir))
    except Preempted as p:
        print(f"preempted: {p}", file=sys.stderr)
        if callable(p.previous_handler):
            # submitit's handler pickles this job and requeues it on SLURM, then exits.
            p.previous_handler(p.signum, None)
        # The status of a process ended by that signal: SLURM and submitit read it as preemption, not failure.
        sys.exit(128 + p.signum)
    if results[K.STATUS] != "ok":
        if results.get(K.TRACEBACK) and (hc.verbose or os.environ.get("PRIORBENCH_TRACEBACK")):
            print(results[K.TRACEBACK], file=sys.stderr)
        print(f"error: {results[K.ERROR]}", file=sys.stderr)
        if hc.mode != RunMode.MULTIRUN:
            sys.exit(EXIT_CONFIG if results.get(K.ERROR_KIND) == "config" else EXIT_FAILED)
    return results


def pin_sweep_name(argv: list[str]) -> list[str]:
    """Resolve the default sweep name (a timestamp) once, here: launchers that run jobs in other processes
    (joblib, submitit) would otherwise resolve ${now:...} again in each job and scatter the sweep.

    The user's arguments stay as typed, flags anywhere Hydra allows them; `name=` joins the overrides next to
    the ones given (argparse reads overrides as one run of positional arguments), or leads when there are none."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return argv  # Hydra reports its own usage errors on the same command line
    if not args.multirun or any(o.lstrip("+~").split("=", 1)[0] == "name" for o in args.overrides):
        return argv
    pinned = f"name={datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
    first = next((i for i in range(len(argv)) if argv[i:i + len(args.overrides)] == args.overrides), None)
    i = first if args.overrides and first is not None else 0
    return argv[:i] + [pinned] + argv[i:]


def cli(argv: list[str]) -> None:
    """The command line: group choices checked first (one line, exit 2), then Hydra on the user's arguments."""
    problem = check_group_choices(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    sys.argv[1:] = pin_sweep_name(argv)
    main()


if __name__ == "__main__":
    cli(sys.argv[1:])
