"""Hydra callback: when a sweep ends, write reports/<name>/ and log the comparison table to W&B."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("priorbench")


class ReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.utils import to_absolute_path

        from bench.report import ReportError, aggregate, find_jobs, write_report

        sweep_dir = Path(to_absolute_path(str(config.hydra.sweep.dir)))
        out = Path(to_absolute_path(str(config.paths.reports))) / sweep_dir.name
        try:
            path = write_report([sweep_dir], out)
        except ReportError as e:
            log.error("report: %s", e)
            sys.exit(1)
        jobs = find_jobs([sweep_dir])
        log.info("report written to %s", path)
        print(f"report: {path}")
        self._log_table(config, jobs, aggregate(jobs), sweep_dir)
        failed = [j for j in jobs if j.get("status") != "ok"]
        if failed:
            for j in failed:
                print(f"failed: prior={j.get('prior')} T={j.get('T')} seed={j.get('seed')}: {j.get('error')}",
                      file=sys.stderr)
            sys.exit(1)

    @staticmethod
    def _log_table(config: DictConfig, jobs: list[dict], rows: list[dict], sweep_dir: Path) -> None:
        if config.logger.kind != "wandb":
            return
        from bench.logger import make_logger
        from bench.report import COLUMNS

        logger = make_logger(config, sweep_dir, run_name=f"{sweep_dir.name}-report", group=sweep_dir.name,
                             config={"sweep": str(sweep_dir)}, job_type="report")
        try:
            columns = ["prior", "T", "seeds"] + [c[0] for c in COLUMNS]
            data = [[r["prior"], r["T"], r["n_seeds"]] + [r[c[0]][0] for c in COLUMNS] for r in rows]
            logger.log_table("comparison", columns, data)
        finally:
            logger.finish()
