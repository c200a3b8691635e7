"""W&B logging for one job (offline unless asked), or nothing with logger=none.

Per job: the resolved config; each trained unit's curves on its own step axis (`<unit>/step`, so ImageBART's
scales each start at step 1); the best validation value per unit in the summary; evaluation metrics and
sample grids once; tags (prior, T, seed, sweep); a stable run id derived from the sweep and job folder, so a
requeued or rerun job resumes its run instead of adding a duplicate; results.json as an artifact.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bench.cache import content_key
from bench.errors import ConfigError
from bench import keys as K
from bench.keys import SCHEMA

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

    def best_validation(self, best: dict[str, float]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_artifact(self, name: str, kind: str, paths: list[Path]) -> None:
        pass

    def finish_job(self, results: dict[str, Any], path: Path) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, run) -> None:
        self.run = run
        self._axes: set[str] = set()

    def _axis(self, unit: str) -> str:
        """`<unit>/step`, defined once as the step metric of that unit's train/ and val/ curves."""
        step_key = f"{unit}/step"
        if unit not in self._axes:
            self.run.define_metric(step_key, hidden=True)
            self.run.define_metric(f"train/{unit}/*", step_metric=step_key)
            # summary="min": the run's summary keeps the best (lowest) validation NLL, not the last one.
            self.run.define_metric(f"val/{unit}/*", step_metric=step_key, summary="min")
            self._axes.add(unit)
        return step_key

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        record = dict(metrics)
        if step is not None:
            for unit in {k.split("/")[1] for k in metrics if k.startswith(("train/", "val/")) and k.count("/") >= 2}:
                record[self._axis(unit)] = step
        self.run.log(record)

    def log_image(self, key: str, path: Path) -> None:
        import wandb

        if Path(path).is_file():
            self.run.summary[key] = wandb.Image(str(path))

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if v is None or isinstance(v, (int, float, str, bool)):
                self.run.summary[k] = v

    def best_validation(self, best: dict[str, float]) -> None:
        self.summary({f"best_val/{unit}/bits_per_token": v for unit, v in best.items()})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        # str(): W&B accepts exactly str column names, not a str subclass such as a bench.keys.Key.
        self.run.log({key: wandb.Table(columns=[str(c) for c in columns], data=rows)})

    def log_artifact(self, name: str, kind: str, paths: list[Path]) -> None:
        import wandb

        art = wandb.Artifact(name, type=kind)
        for p in paths:
            p = Path(p)
            if p.is_dir():
                art.add_dir(str(p))
            elif p.is_file():
                art.add_file(str(p))
        self.run.log_artifact(art)

    def finish_job(self, results: dict[str, Any], path: Path) -> None:
        """Evaluation metrics once, in the summary (eval/<key>), and results.json as an artifact."""
        values = {f"eval/{k.name}": results.get(k.name) for k in SCHEMA}
        for key in (K.STATUS, K.ERROR):
            values[str(key)] = results.get(key)
        for k, v in results.items():
            if k.endswith("_ci") and isinstance(v, list) and len(v) == 2:
                values[f"eval/{k}_lo"], values[f"eval/{k}_hi"] = v
        self.summary(values)
        self.log_artifact(f"results-{self.run.id}", "results", [path])

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def validate_logger(cfg: Any) -> None:
    kind = cfg.logger.get("kind")
    if kind not in LOGGER_KINDS:
        raise ConfigError(f"logger={kind} is not one of: {', '.join(LOGGER_KINDS)}")
    if kind == "wandb" and cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode={cfg.wandb.mode} is not one of: {', '.join(WANDB_MODES)}")


def run_id(sweep: str, job: str) -> str:
    """Stable across reruns and requeues of the same job of the same sweep."""
    return f"pb-{content_key('wandb-run', sweep, job)}"


def make_logger(cfg: Any, job_dir: Path, config: dict[str, Any], job_type: str = "job", prior: str | None = None,
                T: Any = None, seed: Any = None) -> NullLogger:
    """A job's run (prior, T and seed name and tag it) or the sweep's `job_type` run (the report)."""
    if cfg.logger.kind == "none":
        return NullLogger()
    import wandb

    w = cfg.wandb
    job_dir = Path(job_dir)
    wdir = Path(w.dir) if w.get("dir") else job_dir
    wdir.mkdir(parents=True, exist_ok=True)
    # Never prompt: offline/disabled need no login, online uses whatever the user configured.
    os.environ.setdefault("WANDB_SILENT", "true")
    sweep = str(cfg.name)
    point = [f"{k}={v}" for k, v in (("prior", prior), ("T", T), ("seed", seed)) if v is not None]
    tags = [*point, f"sweep={sweep}", *list(w.get("tags") or [])]
    run = wandb.init(project=w.project, entity=w.get("entity"), mode=w.mode, dir=str(wdir),
                     name=f"{prior}-T{T}-s{seed}" if job_type == "job" else f"{sweep}-{job_type}",
                     group=sweep, job_type=job_type, config=config, tags=tags,
                     id=run_id(sweep, job_dir.name if job_type == "job" else job_type), resume="allow",
                     reinit="create_new", settings=wandb.Settings(console="off", silent=True))
    return WandbLogger(run)
