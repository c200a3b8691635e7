"""Sweep results as a pandas DataFrame (docs/design.md, "Results and the report").

Torch-free: the report, notebooks and `python bench/report.py` import it without torch. The keys themselves
are the table in bench/keys.py.

    empty_results()     a job's results before any stage: every SCHEMA key None
    load_results(dirs)  one DataFrame row per job: the flattened results, the job's resolved config
                        (`cfg.*` columns), its overrides (`override.*` columns), job folder and sweep name

A *point* is every override except `seed` and `name` (POINT_EXCLUDED): jobs that differ in any other
setting are different points; seeds are aggregated within a point. A prior that declares T does not apply
to it (`T_applies: none` in its results) has one point for every T.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from bench import keys as K
from bench.keys import INTERVAL_KEYS, SCHEMA

SWEEP_MANIFEST = "sweep.json"  # written by the sweep callback at launch: the sweep's id, so stale jobs are known
POINT_EXCLUDED = (K.SEED, "name")  # overrides that do not define a point (docs/design.md)
# Overrides that say where and how a job ran, not what it computed: never a point setting.
RUN_ONLY_PREFIXES = ("paths.", "logger", "wandb.", "hydra", K.THREADS, K.UNIT_WORKERS, K.DEVICE, "stage")


class ResultsError(ValueError):
    """A sweep folder that cannot be read (no such folder, no jobs)."""


def empty_results() -> dict[str, Any]:
    """Every schema key (None), every interval key, and the maps each job fills; plain str keys, so the dict and
    the DataFrame built on it carry no bench.keys.Key objects into libraries that check exact types (W&B)."""
    r: dict[str, Any] = {str(k): None for k in SCHEMA}
    for k in INTERVAL_KEYS:
        r[k.ci] = None
        r[k.se] = None
    r.update({str(K.STATUS): "ok", str(K.UNAVAILABLE): {}, str(K.STAGE_SECONDS): {}})
    return r


# ---- loading ----------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = d
    return out


def read_overrides(job_dir: Path) -> dict[str, str]:
    """The job's task overrides (`.hydra/overrides.yaml`) as {key: value string}."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def sweep_id(sweep_dir: Path) -> str | None:
    path = Path(sweep_dir) / SWEEP_MANIFEST
    try:
        return json.loads(path.read_text()).get("id")
    except (OSError, ValueError):
        return None


def job_number(d: Path) -> int | None:
    """Hydra's job number, the leading field of a job folder's name: the order of the grid."""
    num = d.name.split("_", 1)[0]
    return int(num) if num.isdigit() else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep, in job-number order: those holding results.json, not inside W&B or Hydra folders."""
    def order(d: Path) -> tuple:
        num = job_number(d)
        return (float("inf") if num is None else num, d.name)

    return sorted((p.parent for p in Path(sweep_dir).rglob("results.json")
                   if ".hydra" not in p.parts and "wandb" not in p.parts), key=order)


def read_job(job_dir: Path) -> dict[str, Any]:
    path = Path(job_dir) / "results.json"
    try:
        r = json.loads(path.read_text())
    except ValueError as e:
        r = {K.STATUS: "failed", K.ERROR: f"unreadable results.json ({e})"}
    base = empty_results()
    base.update(r)
    return base


def is_point_setting(key: str) -> bool:
    return key not in POINT_EXCLUDED and not key.startswith(RUN_ONLY_PREFIXES)


def load_results(*sweep_dirs: str | Path, include_stale: bool = False) -> pd.DataFrame:
    """One row per job of the given sweep folders.

    Columns: every SCHEMA key and `<key>_ci` / `<key>_se` of interval keys; `cfg.<dotted.key>` for the job's
    resolved config; `override.<key>` for each override; `job_dir`, `sweep`, `stale` (a job folder left by
    an earlier launch under the same sweep name: not in the sweep's own list), `point` (the tuple of point
    settings, with T dropped where it does not apply), plus the results' maps (`unavailable`, `tokenizer`,
    `baselines`, `train_units`, `stage_seconds`) as object columns. Stale jobs are dropped unless
    include_stale.
    """
    rows = []
    for sweep in sweep_dirs:
        sweep = Path(sweep)
        if not sweep.is_dir():
            raise ResultsError(f"{sweep}: no such sweep folder")
        sid = sweep_id(sweep)
        for d in job_dirs(sweep):
            r = read_job(d)
            if r.get(K.PRIOR) is None:
                r[K.PRIOR] = "?"
            cfg_path = d / ".hydra" / "config.yaml"
            cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
            overrides = read_overrides(d)
            row = dict(r)
            row.update({f"cfg.{k}": v for k, v in _flatten(cfg or {}).items()})
            row.update({f"override.{k}": v for k, v in overrides.items()})
            row["overrides"] = " ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
            row["job_dir"] = str(d)
            row["sweep"] = sweep.name
            row["job_num"] = job_number(d)
            row["stale"] = sid is not None and r.get(K.SWEEP_ID) != sid
            settings = {k: v for k, v in overrides.items() if is_point_setting(k)}
            if r.get(K.T_APPLIES) == "none":
                settings.pop(K.T, None)
            row["point"] = tuple(sorted(settings.items()))
            rows.append(row)
    if not rows:
        raise ResultsError(f"no results.json under {', '.join(map(str, sweep_dirs))}")
    df = pd.DataFrame(rows)
    return df if include_stale else drop_stale(df, sweep_dirs)


def drop_stale(df: pd.DataFrame, sweep_dirs: Sequence[Path]) -> pd.DataFrame:
    """The jobs of each sweep's latest launch; an error if there are none."""
    fresh = df[~df["stale"]].reset_index(drop=True)
    if fresh.empty:
        raise ResultsError(f"every job under {', '.join(map(str, sweep_dirs))} is stale (left by an earlier launch)")
    return fresh


def finite(v: Any) -> bool:
    """A real number that is not NaN or infinite (Python or numpy scalar; never a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)
