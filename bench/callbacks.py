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

from bench.cache import atomic_write_json
from bench.results import SWEEP_MANIFEST

log = logging.getLogger("priorbench")


def sweep_dir_of(config: DictConfig) -> Path:
    return Path(to_absolute_path(str(config.hydra.sweep.dir)))


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
        """A fresh id per launch: jobs record it, so folders left by an earlier grid of the same name are stale."""
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
        failed = df[df["status"] != "ok"]
        if len(failed):
            for _, j in failed.iterrows():
                print(f"failed: prior={j['prior']} T={j['T']} seed={j['seed']}: {j['error']}", file=sys.stderr)
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
