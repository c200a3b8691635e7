"""A sweep's cost before its first job: every job's plan (bench/cost.py) and their total, printed at launch.

The jobs are enumerated as Hydra's sweeper will launch them (its own split of the command line's sweep
overrides, each job's config composed by Hydra's config loader), validated as the job will be, and costed from
configuration and file counts alone. A job whose options are wrong is left out with its one-line reason: it
fails by itself, before any work, when it runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, open_dict

from bench import cost as C
from bench.errors import ConfigError

log = logging.getLogger("priorbench")


@dataclass
class JobCost:
    label: str  # prior=..., T=..., seed=...
    cost: C.Cost | None
    error: str | None = None
    keys: dict[str, str] | None = None  # the cache keys of its stages: jobs that share one compute it once


def sweep_job_configs(config: DictConfig) -> list[DictConfig]:
    """Each job's composed config, in launch order, as Hydra's basic sweeper splits the sweep."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(config.hydra.overrides.task))
    batches = BasicSweeper.split_arguments(parsed, None)
    configs = []
    for job in (job for batch in batches for job in batch):
        cfg = loader.load_sweep_config(config, list(job))
        with open_dict(cfg):
            del cfg["hydra"]  # a job's own config has no hydra node
        configs.append(cfg)
    return configs


def job_cost(cfg: DictConfig, extractors: dict[Any, Any]) -> tuple[C.Cost, dict[str, str]]:
    """One job's cost, as its own plan computes it (the Inception extractor loaded once per weights option), and
    its stages' cache keys."""
    from bench import features as FE
    from bench.pipeline import Job, cost_plan, stage_keys, validate

    settings = validate(cfg)
    weights = cfg.eval.get("inception_weights")
    if weights not in extractors:
        extractors[weights] = FE.load_feature_extractor(weights)
    job = Job(cfg, None, settings, {}, extractors[weights])
    return cost_plan(job), stage_keys(job)


def sweep_costs(config: DictConfig) -> list[JobCost]:
    extractors: dict[Any, Any] = {}
    out = []
    for cfg in sweep_job_configs(config):
        label = f"prior={cfg.prior.name} T={cfg.T} seed={cfg.seed}"
        try:
            cost, keys = job_cost(cfg, extractors)
            out.append(JobCost(label, cost, keys=keys))
        except ConfigError as e:
            out.append(JobCost(label, None, str(e).splitlines()[0]))
    return out


def log_sweep_cost(config: DictConfig) -> list[JobCost]:
    """Log every job's estimated hours and the sweep's totals (Hydra's launch log: on the console)."""
    jobs = sweep_costs(config)
    costed = [j for j in jobs if j.cost is not None]
    lines = []
    for j in jobs:
        if j.cost is None:
            lines.append(f"sweep plan: {j.label}: not costed: {j.error}")
        else:
            hours = ", ".join(f"{name} {C.format_hours(h)}" for name, h in j.cost.hours.items())
            fd = "; FD extractors: " + "; ".join(f.line() for f in j.cost.fd) if j.cost.fd else ""
            lines.append(f"sweep plan: {j.label}: {j.cost.params:,} parameters, {hours}{fd}")
    if costed:
        total = C.total([j.cost for j in costed], [j.keys for j in costed])
        lines += [f"sweep plan: total over {len(costed)} job(s), each stage counted once per cache key (shared "
                  f"tokens, one training for every T that reuses it)"]
        lines += [f"sweep plan: {line.removeprefix('cost: ')}" for line in total.lines()]
    for line in lines:
        log.info(line)
    return jobs
