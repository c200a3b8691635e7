"""One job = one (prior, T, seed) point: validate, then run the cached stages.

`run_job(cfg, job_dir)` is a plain function returning the results dict, so
tests call it directly; `bench/run.py` is the thin Hydra entry around it.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bench.cache import atomic_torch_save, atomic_write_json, cached_stage, content_key, read_meta
from bench.errors import ConfigError
from bench.train import Preempted

log = logging.getLogger("priorbench")

STAGES = ("tokens", "train", "all")
RESULT_KEYS = (
    "prior", "T", "seed", "status", "error", "params", "train_steps", "train_seconds",
    "nll_bits_per_token", "nll_kind", "fid", "kid_mean", "kid_std", "is_mean", "is_std",
    "precision", "recall", "density", "coverage", "completion_fid",
    "sample_seconds_per_image", "samples_per_second", "nfe", "batch_size", "peak_memory_mb",
    "n_samples", "feature_extractor", "device", "tokens_key", "train_key",
)


# ---- configuration -------------------------------------------------------

def container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def resolve_device(cfg: DictConfig) -> torch.device:
    want = str(cfg.get("device", "auto"))
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={want}: CUDA is not available on this machine")
    if not (want == "cpu" or want.startswith("cuda")):
        raise ConfigError(f"device={want} is not one of: auto, cpu, cuda")
    return torch.device(want)


def resolve_precision(cfg: DictConfig, device: torch.device) -> str:
    """The compute precision of training, sampling and completion: "bf16" (autocast) or "fp32".
    auto is bf16 on CUDA and fp32 on CPU; NLL and metrics are always computed in float32."""
    want = str(cfg.get("precision", "auto"))
    if want not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision={want} is not one of: auto, fp32, bf16")
    return "bf16" if want == "bf16" or (want == "auto" and device.type == "cuda") else "fp32"


def _precision_part(precision: str) -> list[str]:
    """Cache-key part for the precision: bf16 runs get their own key; fp32 adds nothing, so fp32 keys are the
    ones written before precision entered the key."""
    return ["bf16"] if precision == "bf16" else []


def prior_settings(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """(prior name, its options without `name`)."""
    pc = container(cfg.prior)
    return pc["name"], {k: v for k, v in pc.items() if k != "name"}


def check_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{option}={value} must be an integer")
    return value


def expected_grid(cfg: DictConfig) -> tuple[int, int, int]:
    """(h, w, n_embed) of the tokenizer from its config alone, for validation before any work."""
    tok = cfg.tokenizer
    if tok.kind == "taming":
        proj = OmegaConf.load(str(Path(str(tok.config)).expanduser()))
        params = proj.model.params
        dd = params.ddconfig
        f = 2 ** (len(dd.ch_mult) - 1)
        return int(cfg.data.resolution) // f, int(cfg.data.resolution) // f, int(params.n_embed)
    f = 2 ** (len(tok.model.ch_mult) - 1)
    return int(tok.model.resolution) // f, int(tok.model.resolution) // f, int(tok.model.n_embed)


def build_prior_checked(cfg: DictConfig, vocab_size: int, grid: tuple[int, int], device: str | torch.device = "cpu"):
    """Build the job's prior, turning any bad option into a one-line ConfigError."""
    from priors import PRIORS, build_prior

    name, options = prior_settings(cfg)
    if name not in PRIORS:
        raise ConfigError(f"prior={name} is not one of: {', '.join(sorted(PRIORS))}")
    T = check_int(cfg.T, "T")
    budget = check_int(cfg.budget.params, "budget.params")
    try:
        with torch.device(device):
            return build_prior(name, vocab_size, grid, T=T, budget=budget, cfg=options)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(msg if "=" in msg or "prior" in msg else f"prior={name}: {msg}") from None


def validate(cfg: DictConfig) -> None:
    """Every check that needs no work: bad input stops the job before anything is computed."""
    from bench.data import resolve_files
    from bench.logger import validate_logger
    from bench.tokens import validate_tokenizer

    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage} is not one of: {', '.join(STAGES)}")
    check_int(cfg.seed, "seed")
    resolve_precision(cfg, resolve_device(cfg))
    validate_logger(cfg)
    if int(cfg.eval.num_samples) < 2:
        raise ConfigError(f"eval.num_samples={cfg.eval.num_samples} must be at least 2")
    validate_tokenizer(cfg.tokenizer)
    resolve_files(cfg.data)
    h, w, n_embed = expected_grid(cfg)
    # The effective codebook is at most n_embed: checking the budget at that size catches a budget too small.
    build_prior_checked(cfg, n_embed, (h, w), device="meta")


# ---- stages ---------------------------------------------------------------

def train_key(cfg: DictConfig, tokens_key: str, precision: str = "fp32") -> str:
    from priors import PRIORS

    name, options = prior_settings(cfg)
    options.pop("sample", None)  # sampling-only settings never retrain
    options.pop("nll_samples", None)  # evaluation-only (absorbing's Monte Carlo ELBO draws)
    T = int(cfg.T) if PRIORS[name].T_affects_training else None
    return content_key("train-v1", tokens_key, name, options, T, int(cfg.budget.params),
                       container(cfg.train), int(cfg.seed), *_precision_part(precision))


def eval_key(cfg: DictConfig, tkey: str, ref_key: str, precision: str = "fp32") -> str:
    name, options = prior_settings(cfg)
    # AR ignores T; absorbing samples per T; ImageBART's T is already in the train key.
    T = None if name == "ar" else int(cfg.T)
    return content_key("eval-v1", tkey, ref_key, options.get("sample"), T, container(cfg.eval), int(cfg.seed),
                       *_precision_part(precision))


def load_trained(prior, train_dir: Path) -> None:
    for unit, module in prior.units().items():
        path = train_dir / f"{unit}.pt"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("arch") != prior.arch_config() or ckpt.get("unit") != unit:
            raise ConfigError(f"checkpoint {path} was trained with a different prior configuration")
        module.load_state_dict(ckpt["state_dict"])


def train_stage(cfg: DictConfig, prior, tokens, device: torch.device, precision: str, logger
                ) -> tuple[Path, str, dict]:
    from bench.train import train_unit

    key = train_key(cfg, tokens.key, precision)
    root = Path(cfg.paths.cache)
    work = root / "train" / f"{key}.work"

    def build(tmp: Path) -> dict[str, Any]:
        work.mkdir(parents=True, exist_ok=True)
        units = {}
        for i, unit in enumerate(prior.units()):
            r = train_unit(prior, unit, tokens.train, tokens.val, cfg.train, int(cfg.seed) * 100 + i, work,
                           device, precision, log_fn=logger.log)
            atomic_torch_save({"arch": prior.arch_config(), "prior": prior.name, "unit": unit,
                               "state_dict": r["state_dict"], "best_val": r["best_val"],
                               "best_step": r["best_step"]}, tmp / f"{unit}.pt")
            units[unit] = {k: r[k] for k in ("best_val", "best_step", "seconds", "steps")}
            log.info("train: %s:%s done, best val %.4f bits/token at step %d", prior.name, unit, r["best_val"],
                     r["best_step"])
        return {"prior": prior.name, "params": prior.num_params(), "units": units,
                "train_seconds": sum(u["seconds"] for u in units.values()),
                "train_steps": int(cfg.train.steps)}

    d = cached_stage(root, "train", key, build, what=f"train {prior.name}")
    shutil.rmtree(work, ignore_errors=True)
    load_trained(prior, d)
    return d, key, read_meta(d)


def env_info(device: torch.device) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(), "commit": commit,
    }


# ---- the job -------------------------------------------------------------

def empty_results(cfg: DictConfig) -> dict[str, Any]:
    r = {k: None for k in RESULT_KEYS}
    r.update(prior=cfg.prior.name, T=cfg.T, seed=cfg.seed, status="ok", unavailable={}, stage_seconds={})
    return r


def run_job(cfg: DictConfig, job_dir: Path) -> dict[str, Any]:
    """Run one job to `cfg.stage`; always returns the results dict, written to job_dir/results.json.

    A failure (bad option before any work, or an error during it) gives status "failed" and a one-line
    `error`, so one bad point never takes a sweep down.
    """
    from bench.data import load_data
    from bench.logger import make_logger
    from bench.tokens import build_tokens, load_tokenizer

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    results = empty_results(cfg)
    t_job = time.time()
    logger = None
    try:
        validate(cfg)
        device = resolve_device(cfg)
        precision = resolve_precision(cfg, device)
        results.update(env_info(device), compute_precision=precision)
        cache_root = Path(cfg.paths.cache)
        name, _ = prior_settings(cfg)
        logger = make_logger(cfg, job_dir, run_name=f"{name}-T{cfg.T}-s{cfg.seed}", group=str(cfg.name),
                             config=container(cfg))

        t = time.time()
        data = load_data(cfg.data, cache_root)
        tokens = build_tokens(cfg.tokenizer, data, cache_root, str(device))
        results["tokens_key"] = tokens.key
        results["tokenizer"] = {k: tokens.meta.get(k) for k in
                                ("vocab_size", "n_embed", "grid", "recon_psnr", "codebook_usage",
                                 "codebook_perplexity")}
        results["stage_seconds"]["tokens"] = time.time() - t

        t = time.time()
        from bench import metrics as M
        from bench.evaluate import build_reference, load_reference, reconstruction_fid

        extractor = M.load_feature_extractor(cfg.eval.get("inception_weights"), device=str(device))
        ref_dir, ref_key = build_reference(data, extractor, cfg.eval, cache_root)
        results["tokenizer"]["recon_fid"] = reconstruction_fid(tokens, ref_dir, ref_key, extractor, cfg.eval,
                                                               cache_root)["recon_fid"]
        results["stage_seconds"]["reference"] = time.time() - t
        logger.summary({f"tokenizer/{k}": v for k, v in results["tokenizer"].items()})
        if cfg.stage == "tokens":
            log.info("stage=tokens: stopping after the shared tokens and reference features")
            results["status"] = "ok"
            return finish(results, job_dir, t_job, logger)

        t = time.time()
        torch.manual_seed(int(cfg.seed))  # the initial weights: the same seed gives the same run
        prior = build_prior_checked(cfg, tokens.vocab_size, tokens.grid).to(device)
        results["params"] = prior.num_params()
        train_dir, tkey, train_meta = train_stage(cfg, prior, tokens, device, precision, logger)
        results.update(train_key=tkey, train_steps=train_meta["train_steps"],
                       train_seconds=train_meta["train_seconds"], train_units=train_meta["units"])
        results["stage_seconds"]["train"] = time.time() - t
        if cfg.stage == "train":
            log.info("stage=train: stopping after training")
            return finish(results, job_dir, t_job, logger)

        t = time.time()
        ekey = eval_key(cfg, tkey, ref_key, precision)
        from bench.evaluate import evaluate_prior

        def build_eval(tmp: Path) -> dict[str, Any]:
            ref_feats, ref_stats = load_reference(ref_dir)
            tok_model = load_tokenizer(cache_root / "tokenizer" / tokens.tokenizer_key,
                                       cfg.tokenizer, str(device))
            t0 = time.time()
            values, missing = evaluate_prior(prior, tokens, tok_model, extractor, ref_feats, ref_stats, cfg.eval,
                                             int(cfg.seed), device, tmp, precision=precision)
            atomic_write_json(tmp / "metrics.json", {"values": values, "unavailable": missing})
            return {"eval_seconds": time.time() - t0}

        eval_dir = cached_stage(cache_root, "eval", ekey, build_eval, what=f"eval {name} T={cfg.T}")
        ev = json.loads((eval_dir / "metrics.json").read_text())
        results.update(ev["values"])
        results["unavailable"].update(ev["unavailable"])
        results["eval_dir"] = str(eval_dir)
        for grid in ("samples_grid.png", "completion_grid.png"):
            if (eval_dir / grid).is_file():
                shutil.copy2(eval_dir / grid, job_dir / grid)
                logger.log_image(f"eval/{grid[:-4]}", job_dir / grid)
        results["stage_seconds"]["eval"] = time.time() - t
        logger.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and v is not None})
        return finish(results, job_dir, t_job, logger)
    except Preempted:
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    except ConfigError as e:
        results.update(status="failed", error=str(e).splitlines()[0] if str(e) else "invalid configuration",
                       error_kind="config")
        return finish(results, job_dir, t_job, logger)
    except Exception as e:  # noqa: BLE001 - one failed job must not take the sweep down
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        results.update(status="failed", error=msg, error_kind="runtime", traceback=traceback.format_exc())
        return finish(results, job_dir, t_job, logger)


def finish(results: dict[str, Any], job_dir: Path, t_job: float, logger) -> dict[str, Any]:
    results["job_seconds"] = time.time() - t_job
    atomic_write_json(job_dir / "results.json", results)
    if logger is not None:
        try:
            logger.summary({k: results.get(k) for k in RESULT_KEYS})
        finally:
            logger.finish(exit_code=0 if results["status"] == "ok" else 1)
    return results
