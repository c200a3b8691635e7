"""W&B logging for one job (offline unless asked), or nothing with logger=none."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOGGER_KINDS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


class NullLogger:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: Path) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, run) -> None:
        self.run = run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics)

    def log_image(self, key: str, path: Path) -> None:
        import wandb

        if Path(path).is_file():
            self.run.log({key: wandb.Image(str(path))})

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if v is None or isinstance(v, (int, float, str, bool)):
                self.run.summary[k] = v

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def validate_logger(cfg: Any) -> None:
    kind = cfg.logger.get("kind")
    if kind not in LOGGER_KINDS:
        from bench.errors import ConfigError

        raise ConfigError(f"logger={kind} is not one of: {', '.join(LOGGER_KINDS)}")
    if kind == "wandb" and cfg.wandb.mode not in WANDB_MODES:
        from bench.errors import ConfigError

        raise ConfigError(f"wandb.mode={cfg.wandb.mode} is not one of: {', '.join(WANDB_MODES)}")


def make_logger(cfg: Any, job_dir: Path, run_name: str, group: str, config: dict[str, Any],
                job_type: str = "job") -> NullLogger:
    if cfg.logger.kind == "none":
        return NullLogger()
    import wandb

    wdir = Path(cfg.wandb.dir) if cfg.wandb.get("dir") else Path(job_dir)
    wdir.mkdir(parents=True, exist_ok=True)
    # Never prompt: offline/disabled need no login, online uses whatever the user configured.
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.get("entity"), mode=cfg.wandb.mode,
                     dir=str(wdir), name=run_name, group=group, job_type=job_type, config=config,
                     reinit="create_new", settings=wandb.Settings(console="off", silent=True))
    return WandbLogger(run)
