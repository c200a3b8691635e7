"""The one schema of result keys, and sweep results as a pandas DataFrame (DESIGN.md sections 4 and 6).

Torch-free: the report, notebooks and `python bench/report.py` import it without torch.

    SCHEMA              every key of results.json: title, unit, digits, direction, where it comes from
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

SWEEP_MANIFEST = "sweep.json"  # written by the sweep callback at launch: the sweep's id, so stale jobs are known
POINT_EXCLUDED = ("seed", "name")  # overrides that do not define a point (DESIGN.md section 6)
# Overrides that say where and how a job ran, not what it computed: never a point setting.
RUN_ONLY_PREFIXES = ("paths.", "logger", "wandb.", "hydra", "threads", "unit_workers", "device", "stage")


class ResultsError(ValueError):
    """A sweep folder that cannot be read (no such folder, no jobs)."""


@dataclass(frozen=True)
class Key:
    name: str
    title: str
    unit: str = ""
    digits: int = 3
    lower_is_better: bool | None = None  # None: not a quality measure
    source: str = "eval"  # job | tokenizer | train | eval | speed | env
    interval: bool = False  # results.json also carries `<name>_ci` = [lo, hi] (95%) and `<name>_se`
    column: bool = False  # a column of the report's main table
    doc: str = ""


SCHEMA: tuple[Key, ...] = (
    # identity and status
    Key("prior", "Prior", source="job", doc="prior name (conf/prior/)"),
    Key("T", "T", source="job", digits=0, doc="ImageBART chain length / absorbing sampling steps"),
    Key("prior_label", "Prior", source="job", doc="the prior's name in reports (declared by the prior)"),
    Key("T_applies", "T applies to", source="job", doc="how T applies to the prior: none | training | sampling"),
    Key("seed", "seed", source="job", digits=0),
    Key("status", "status", source="job", doc="ok | failed"),
    Key("error", "error", source="job", doc="null or one line"),
    Key("sweep_id", "sweep id", source="job", doc="id of the sweep launch that wrote this job"),
    Key("threads", "threads", source="job", digits=0, doc="intra-op CPU threads the job computed with"),
    Key("unit_workers", "unit workers", source="job", digits=0,
        doc="units (ImageBART scales) trained at once, each with threads // unit_workers threads"),
    # training
    Key("params", "Params", source="train", digits=0, column=True, doc="trainable transformer parameters"),
    Key("train_steps", "train steps", source="train", digits=0),
    Key("train_seconds", "train s", "s", 1, source="train", doc="training time summed over the prior's units"),
    Key("train_wall_seconds", "train wall s", "s", 1, source="train",
        doc="wall time of the training stage (units trained at once overlap: see unit_workers)"),
    # likelihood
    Key("nll_bits_per_token", "NLL", "bits/token", 3, True, interval=True, column=True,
        doc="exact, ELBO or sampler bound (nll_kind); interval and stderr over validation sequences"),
    Key("nll_stderr", "NLL stderr", "bits/token", 4, doc="standard error over validation sequences (incl. Monte Carlo)"),
    Key("nll_kind", "NLL kind", doc="exact | elbo | order_bound"),
    Key("nll_sequences", "NLL sequences", digits=0, doc="validation sequences the NLL averages"),
    Key("elbo_eq6_bits_per_token", "Eq. 6 ELBO", "bits/token", 3, True, interval=True,
        doc="absorbing: Unleashing Eq. 6 ELBO (what the paper reports and training optimises)"),
    # sample metrics
    Key("fid", "FID", "", 2, True, interval=True, column=True),
    Key("kid_mean", "KID", "", 4, True, interval=True, column=True,
        doc="unbiased MMD^2 of all samples against all reference rows (the limit of torch-fidelity's subset mean)"),
    Key("is_mean", "IS", "", 2, False, interval=True, column=True),
    Key("is_std", "IS std", "", 2),
    Key("prdc_precision", "Prec.", "", 3, False, interval=True, column=True),
    Key("recall", "Rec.", "", 3, False, interval=True, column=True),
    Key("density", "Dens.", "", 3, False, interval=True, column=True),
    Key("coverage", "Cov.", "", 3, False, interval=True, column=True),
    Key("completion_fid", "Compl. FID", "", 2, True, interval=True, column=True,
        doc="upper-half completion FID (ImageBART Tab. 3 right)"),
    Key("train_match", "Train match", "", 3, None, interval=True, column=True,
        doc="mean over samples of the largest share of token positions shared with one training grid (1: a copy); "
            "the real val row gives the level of unseen images"),
    Key("train_copies", "train copies", "", 3, None, interval=True,
        doc="share of samples whose token grid is exactly a training grid"),
    Key("n_match_samples", "N match samples", digits=0, doc="samples searched against the training grids"),
    Key("n_samples", "N samples", digits=0, doc="generated samples per metric"),
    Key("n_completions", "N completions", digits=0),
    Key("n_reference", "N reference", digits=0, doc="reference images for FID/KID (PRDC: n_samples of them)"),
    Key("n_bootstrap", "bootstrap resamples", digits=0),
    Key("feature_extractor", "features"),
    # speed and memory
    Key("sample_seconds_per_image", "s/img", "s", 4, True, source="speed", column=True,
        doc="token generation at batch_size, warm-up excluded"),
    Key("samples_per_second", "img/s", "1/s", 2, False, source="speed"),
    Key("decode_seconds_per_image", "decode s/img", "s", 5, True, source="speed"),
    Key("decode_images_per_second", "decode img/s", "1/s", 1, False, source="speed"),
    Key("nfe", "NFE", digits=0, source="speed", column=True, doc="network evaluations per sample() call"),
    Key("sample_flops_per_image", "GFLOP/img", "FLOP", 0, source="speed",
        doc="model FLOPs of sample() per image, counted from the architecture, NFE and context lengths"),
    Key("achieved_flops", "FLOP/s", "FLOP/s", 0, False, source="speed"),
    Key("peak_flops", "peak FLOP/s", "FLOP/s", 0, source="speed", doc="the device's measured matmul peak"),
    Key("sampler_peak_percent", "% limit", "%", 1, False, source="speed", column=True,
        doc="sampling's roofline time, max(model FLOPs / matmul peak, bytes read / read bandwidth), as a "
            "percentage of its measured time"),
    Key("compile", "compile", source="speed", doc="eval.compile as resolved: on | off"),
    Key("compile_seconds", "compile s", "s", 1, source="speed", doc="compiling, in the warm-up batch; never in s/img"),
    Key("completion_nfe", "completion NFE", digits=0, source="speed"),
    Key("batch_size", "batch", digits=0, source="speed"),
    Key("peak_memory_mb", "peak MB", "MiB", 0, source="speed",
        doc="CUDA: peak allocated during sampling; CPU: peak RSS of the job's sampling (reset before)"),
    # the cost plan (bench/cost.py), estimated before any work
    Key("plan_train_flops", "planned train FLOP", "FLOP", 0, source="plan",
        doc="model FLOPs of training every unit (3 x forward x batch x steps) and its validation forwards"),
    Key("plan_sample_flops", "planned sample FLOP", "FLOP", 0, source="plan",
        doc="model FLOPs of the evaluation's samples and completions (the prior's sample_flops per image)"),
    Key("plan_inception_images", "planned Inception images", digits=0, source="plan",
        doc="Inception forwards: reference, samples, completions and the two baseline rows"),
    Key("plan_inception_flops", "planned Inception FLOP", "FLOP", 0, source="plan"),
    Key("plan_tokenizer_flops", "planned tokenizer FLOP", "FLOP", 0, source="plan",
        doc="training the VQGAN here (0 for a released one) and encoding the images"),
    Key("plan_decode_flops", "planned decode FLOP", "FLOP", 0, source="plan",
        doc="decoding the val reconstructions, samples and completions"),
    Key("plan_disk_bytes", "planned cache disk", "B", 0, source="plan",
        doc="token cache, reference features, checkpoints and samples this job's stages write"),
    Key("plan_memory_bytes", "planned peak memory", "B", 0, source="plan",
        doc="the least memory of the job's largest phase (bench/memory.py: weights and optimizer state with "
            "training activations, sampling's KV cache, evaluation's feature batches and matrices)"),
    Key("plan_hours", "planned hours", "h", 2, source="plan",
        doc="estimated hours per device (A100, H100 SXM at bf16 peak, the job's own device at its measured peak), "
            "at bench.cost.UTILISATION"),
    Key("compute_precision", "precision", source="env", doc="fp32 | bf16 (compute dtype of sampling/training)"),
    Key("device", "device", source="env"),
    Key("tokens_key", "tokens key", source="job"),
    Key("train_key", "train key", source="job"),
)
KEYS: dict[str, Key] = {k.name: k for k in SCHEMA}
INTERVAL_KEYS = tuple(k.name for k in SCHEMA if k.interval)
COLUMN_KEYS = tuple(k.name for k in SCHEMA if k.column)
# Sample metrics whose baseline rows (real val images, tokenizer reconstructions) exist at the column's N.
BASELINE_KEYS = ("fid", "kid_mean", "is_mean", "prdc_precision", "recall", "density", "coverage", "completion_fid",
                 "train_match", "train_copies")


def empty_results() -> dict[str, Any]:
    """Every schema key (None), every interval key, and the maps each job fills."""
    r: dict[str, Any] = {k.name: None for k in SCHEMA}
    for name in INTERVAL_KEYS:
        r[f"{name}_ci"] = None
        r[f"{name}_se"] = None
    r.update(status="ok", unavailable={}, stage_seconds={})
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
        r = {"status": "failed", "error": f"unreadable results.json ({e})"}
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
            if r.get("prior") is None:
                r["prior"] = "?"
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
            row["stale"] = sid is not None and r.get("sweep_id") != sid
            settings = {k: v for k, v in overrides.items() if is_point_setting(k)}
            if r.get("T_applies") == "none":
                settings.pop("T", None)
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
