"""Hydra callback: mark a sweep's launch, and when it ends write reports/<name>/ and log it to W&B."""
from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from bench.cache import atomic_write_json, check_folder
from bench.errors import EXIT_CONFIG, ConfigError
from bench import keys as K
from bench.results import SWEEP_MANIFEST
from priors import PRIORS

log = logging.getLogger("priorbench")


def sweep_dir_of(config: DictConfig) -> Path:
    return Path(to_absolute_path(str(config.hydra.sweep.dir)))


def check_name(name: str) -> None:
    """`name` is one folder name: it names multirun/NAME and reports/NAME, and must stay inside both."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"name={name} must be one folder name (no '/', not '.' or '..'): it names "
                          "multirun/NAME and reports/NAME")


def sweep_priors(config: DictConfig) -> set[str]:
    """The prior names this sweep can run: its `prior=` override expanded as Hydra will, or the composed one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    names = {str(config.prior.name)}
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    for o in overrides:
        if o.key_or_group == "prior" and not o.is_delete():
            value = o.value()
            if isinstance(value, Glob):
                names |= set(value.filter(sorted(PRIORS)))
            else:
                names |= {str(v) for v in (o.sweep_string_iterator() if o.is_sweep_override() else [value])}
    return names


def check_sweep(config: DictConfig) -> None:
    """The options only the sweep reads (name, compare_to, paths.reports): checked before the first job, so a
    typo does not surface after every job ran."""
    check_name(str(config.name))
    known = sorted(set(PRIORS) | sweep_priors(config))
    if str(config.compare_to) not in known:
        raise ConfigError(f"compare_to={config.compare_to} is not one of the priors: {', '.join(known)}")
    reports = Path(to_absolute_path(str(config.paths.reports)))
    check_folder(reports / sweep_dir_of(config).name, "paths.reports", config.paths.reports)


def announce_cost(config: DictConfig) -> None:
    """The sweep's cost before its first job (bench/planning.py). An estimate: if it cannot be made, the sweep
    says so and runs."""
    from bench.planning import log_sweep_cost

    try:
        log_sweep_cost(config)
    except Exception as e:  # noqa: BLE001 - the plan informs; it never stops a sweep
        log.warning("sweep plan: not available (%s: %s)", type(e).__name__, str(e).splitlines()[0] if str(e) else "")


class ReportCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the sweep's own options before the first job, then mark the launch with a fresh id: jobs record
        it, so folders left by an earlier grid of the same name are stale."""
        try:
            check_sweep(config)
        except ConfigError as e:
            # A SystemExit passes through Hydra's callback wrapper, which turns exceptions into warnings.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        d = sweep_dir_of(config)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / SWEEP_MANIFEST, {"id": uuid.uuid4().hex[:12], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                               "overrides": list(config.hydra.overrides.task)})
        announce_cost(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bench.report import ReportError, write_report

        sweep_dir = sweep_dir_of(config)
        out = Path(to_absolute_path(str(config.paths.reports))) / sweep_dir.name
        # Hydra turns a callback's exception into a warning and exits 0: a sweep without its report must not.
        try:
            path, df, summary = write_report([sweep_dir], out)
            log.info("report written to %s", path)
            print(f"report: {path}")
            self._log_report(config, out, sweep_dir, summary)
        except ReportError as e:
            log.error("report: %s", e)
            sys.exit(1)
        except Exception:  # noqa: BLE001
            log.exception("report: failed; rebuild it with python bench/report.py %s", sweep_dir)
            sys.exit(1)
        failed = df[df[K.STATUS] != "ok"]
        if len(failed):
            for _, j in failed.iterrows():
                print(f"failed: prior={j[K.PRIOR]} T={j[K.T]} seed={j[K.SEED]}: {j[K.ERROR]}", file=sys.stderr)
            sys.exit(1)

    @staticmethod
    def _log_report(config: DictConfig, out: Path, sweep_dir: Path, summary: Any) -> None:
        """The comparison table (with intervals) as a W&B Table and the whole report as an artifact."""
        if config.logger.kind != "wandb":
            return
        from bench.logger import make_logger

        logger = make_logger(config, sweep_dir, config={"sweep": str(sweep_dir)}, job_type="report")
        try:
            logger.log_table("comparison", list(summary.columns),
                             summary.astype(object).where(summary.notna(), None).values.tolist())
            logger.log_artifact(f"report-{sweep_dir.name}", "report", [out])
        finally:
            logger.finish()
