"""One job = one point of a sweep: check every option, print the plan, then run the cached stages.

    run_job(cfg, job_dir) -> results dict        (also written to job_dir/results.json)

      validate      every option, before any work (one-line ConfigError)
      plan          which stages are cached and which will run, with the work they stand for, and the job's cost
                    (FLOPs, Inception passes, cache disk, hours on named devices: bench/cost.py); stage=plan
                    stops here
      data          images and the train/val split
      tokens        tokenizer (trained or loaded) and the shared token cache
      reference     Inception features of a seeded sample of the train split
      baselines     real val images and tokenizer reconstructions at each column's N (table baseline rows)
      train         the prior's checkpoint(s)
      eval          NLL, samples, metrics with intervals, completion, speed

`bench/run.py` is the thin Hydra entry around it; tests call it directly. The harness knows priors only
through their declarations (`Prior.T_applies`, `Prior.eval_only_options`), never by name.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bench import cost as C
from bench import device as D
from bench import features as FE
from bench import keys as K
from bench import memory
from bench.cache import (MANIFEST, atomic_torch_save, atomic_write_json, cached_stage, check_folder, content_key,
                         read_meta)
from bench.data import Files, ImageData, data_key, load_data, resolve_files, selection_files, selection_rows
from bench.errors import ConfigError, Preempted
from bench.evaluate import (EVAL_PARTS, FDFeatures, build_baselines, build_fd_references, build_reference,
                            eval_options_for_key, evaluate_prior, fd_key_part, load_fd, load_reference, plan_fd,
                            read_baselines, reference_key)
from bench.logger import NullLogger, make_logger, validate_logger
from bench.keys import KEYS
from bench.options import EvalConfig, TrainConfig, check_groups
from bench.results import empty_results
from bench.tokens import TokenSet, build_tokens, load_tokenizer, tokens_key, validate_tokenizer
from bench.train import StopFlag, resolve_unit_workers, train_units
from priors import Prior, build_prior, prior_class
from priors.flops import matmul_peak_flops
from image_tokenizers import ReleaseTokenizer, Tokenizer, TokensOptions
from releases import Release, ReleaseOptions, load_release

log = logging.getLogger("priorbench")

STAGES = ("plan", "tokens", "train", "all")


# ---- configuration -------------------------------------------------------

def container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def prior_settings(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """(prior name, its options without `name`)."""
    pc = container(cfg.prior)
    return pc["name"], {k: v for k, v in pc.items() if k != "name"}


def prior_class_of(cfg: DictConfig) -> type[Prior]:
    name, options = prior_settings(cfg)
    try:
        return prior_class(name, options)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_int(value: Any, option: str, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """An integer option within bounds, or a one-line ConfigError naming it."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{option}={value} must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{option}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{option}={value} exceeds {maximum}; raise eval.max_samples if this is intended")
    return value


def build_prior_checked(cfg: DictConfig, vocab_size: int, grid: tuple[int, int],
                        device: str | torch.device = "cpu") -> Prior:
    """Build the job's prior, turning any bad option into a one-line ConfigError."""
    name, options = prior_settings(cfg)
    prior_class_of(cfg)
    T = check_int(cfg.T, "T")
    budget = check_int(cfg.budget.params, "budget.params", minimum=1)
    try:
        with torch.device(device):
            return build_prior(name, vocab_size, grid, T=T, budget=budget, cfg=options)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(msg if "=" in msg or "prior" in msg else f"prior={name}: {msg}") from None


def job_release(cfg: DictConfig) -> Release | None:
    """The released model the job evaluates (the top-level `release:` block), loaded and checked key by key, or
    None when the job trains its own prior. Any wrong file is a one-line ConfigError naming it."""
    node = cfg.get("release")
    if node is None or node.get("family") is None:
        return None
    try:
        return load_release(ReleaseOptions.from_config(container(node)))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def release_prior(cfg: DictConfig, release: Release, tokenizer: Tokenizer) -> Prior:
    """The release's prior with the job's evaluation-only options (conf/prior's `sample` block, T where it applies
    to sampling) set; a prior or tokenizer that does not belong to the release is a one-line ConfigError."""
    name, options = prior_settings(cfg)
    family = release.family
    if name != release.prior_name:
        raise ConfigError(f"prior={name}: release.family={family} loads as prior={release.prior_name} "
                          f"(experiment=release_{family} sets it)")
    if not isinstance(tokenizer, ReleaseTokenizer):
        raise ConfigError(f"tokenizer={tokenizer.name}: a release is evaluated on its own first stage's codes "
                          f"(tokenizer=release; experiment=release_{family} sets it)")
    prior = release.prior
    T = check_int(cfg.T, "T", minimum=1)
    try:
        prior.set_eval_options(None if prior.T_applies == "none" else T, options)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return prior


def release_record(release: Release, prior: Prior, cfg: DictConfig) -> dict[str, Any]:
    """What the report says of a released row: its files (name, sha256), the sampling settings its paper used,
    ours, and which of them differ."""
    _, options = prior_settings(cfg)
    ours = dict(options.get("sample") or {})
    if prior.T_applies == "sampling":
        ours[K.T] = int(cfg.T)
    paper = release.paper_sampling

    def same(k: str) -> bool:
        a, b = paper.get(k), ours.get(k)
        if k == "top_p":  # keeping the whole mass is no nucleus
            a, b = (None if v in (None, 1.0) else v for v in (a, b))
        if isinstance(a, list):  # per-scale settings (a chain's scales)
            return all(v == b for v in a)
        return a == b

    return {"family": release.family, "files": [list(f) for f in release.files], "paper_sampling": paper,
            "sampling": ours, "differs": [k for k in paper if not same(k)], "notes": release.notes}


@dataclass
class Settings:
    """What validation resolves once per job."""
    device: torch.device
    precision: str
    threads: int
    prior_cls: type[Prior]
    tokenizer: Tokenizer  # as configured (its grid and codebook size are known before any work)
    tokens_options: TokensOptions
    params: int  # trainable parameters at the tokenizer's codebook size (the effective codebook is at most that)
    units: list[str]  # the prior's independently trained models
    unit_workers: int  # how many of them train at once (CPU)
    files: Files  # the data's root, train and val files, listed once per job
    train: TrainConfig  # the training loop's options, checked
    eval: EvalConfig  # the evaluation protocol, checked
    peak: memory.Peak | None = None  # the least memory of each phase (bench/memory.py)
    memory_problem: str | None = None  # why the job cannot fit this machine (stage=plan reports it, others stop)
    selection: list[str] = field(default_factory=list)  # train files held out for checkpoint selection
    release: Release | None = None  # the released model evaluated instead of a trained prior


def validate(cfg: DictConfig) -> Settings:
    """Every check that needs no work: bad input stops the job before anything is computed."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage} is not one of: {', '.join(STAGES)}")
    check_int(cfg.seed, "seed", minimum=0)
    threads = D.resolve_threads(cfg.threads)
    device = D.resolve_device(cfg.device)
    precision = D.resolve_precision(cfg.precision, device)
    validate_logger(cfg)
    train, eval_cfg, _ = check_groups(cfg)  # train, eval, data: unknown keys, types and ranges
    check_folder(Path(str(cfg.paths.cache)), "paths.cache", cfg.paths.cache)
    release = job_release(cfg)  # before the tokenizer: a release's first stage is the tokenizer
    tokenizer, tokens_options = validate_tokenizer(cfg)
    files = resolve_files(cfg.data)
    selection = selection_files(cfg.data, files)
    if release is not None:
        prior = release_prior(cfg, release, tokenizer)
    else:
        # The effective codebook is at most the codebook: checking the budget at that size catches a budget too
        # small.
        prior = build_prior_checked(cfg, tokenizer.codebook_size, tokenizer.grid, device="meta")
    params = prior.num_params()
    units = list(prior.units())
    workers = resolve_unit_workers(cfg.unit_workers, len(units), device, threads)
    peak = memory.estimate(prior, params, cfg.train, eval_cfg, workers if device.type == "cpu" else 1,
                           train=release is None, device_type=device.type, precision=precision)
    problem = memory.check_fits(peak, params, D.memory_bytes(device), device.type, cfg)
    if problem and cfg.stage != "plan":  # a plan is often made on another machine than the one that runs it
        raise ConfigError(problem)
    return Settings(device, precision, threads, type(prior), tokenizer, tokens_options, params, units, workers, files,
                    train, eval_cfg, peak, problem, selection, release)


# ---- cache keys ---------------------------------------------------------------

def _precision_part(precision: str) -> list[str]:
    """Cache-key part for the precision: bf16 runs get their own key; fp32 adds nothing, so fp32 keys are the
    ones written before precision entered the key."""
    return ["bf16"] if precision == "bf16" else []


def train_key(cfg: DictConfig, prior_cls: type[Prior], tokens_key: str, precision: str = "fp32",
              selection: list[str] | tuple[str, ...] = ()) -> str:
    """`selection`: the train files held out for checkpoint selection (they are not trained on)."""
    name, options = prior_settings(cfg)
    for opt in prior_cls.eval_only_options:  # sampling/evaluation-only settings never retrain
        options.pop(opt, None)
    T = int(cfg.T) if prior_cls.T_applies == "training" else None
    return content_key("train-v2", tokens_key, name, options, T, int(cfg.budget.params),
                       container(cfg.train), int(cfg.seed), list(selection), *_precision_part(precision))


def release_key(tokens_key: str, release: Release) -> str:
    """The train stage's key of a released prior: the release's weights, on the job's tokens."""
    return content_key("release-v1", tokens_key, release.key)


def job_train_key(cfg: DictConfig, s: "Settings", tokens_key: str) -> str:
    """The job's train key: the trained prior's, or the release's."""
    if s.release is not None:
        return release_key(tokens_key, s.release)
    return train_key(cfg, s.prior_cls, tokens_key, s.precision, s.selection)


def eval_key(cfg: DictConfig, prior_cls: type[Prior], tkey: str, ref_key: str, precision: str = "fp32",
             fd: list[Any] = ()) -> str:
    """fd: bench.evaluate.fd_key_part of eval.fd_features (empty by default, leaving the key as without it)."""
    _, options = prior_settings(cfg)
    evaluation = {k: options.get(k) for k in prior_cls.eval_only_options}
    T = None if prior_cls.T_applies == "none" else int(cfg.T)  # "training": already in the train key
    return content_key("eval-v5", tkey, ref_key, evaluation, T, eval_options_for_key(container(cfg.eval)),
                       int(cfg.seed), *_precision_part(precision), *fd)


def baselines_key(tokens_key: str, ref_key: str, e: EvalConfig, fd: list[Any] = ()) -> str:
    return content_key("baselines-v4", tokens_key, ref_key, e.num_samples, e.completion_samples, e.match_samples,
                       e.bootstrap, e.prdc_k, e.prdc_samples, e.isc_splits, e.split_seed, *fd)


# ---- the job ------------------------------------------------------------------

@dataclass
class Job:
    cfg: DictConfig
    dir: Path
    settings: Settings
    results: dict[str, Any]
    extractor: FE.FeatureExtractor
    logger: Any = field(default_factory=NullLogger)
    fds: list[FDFeatures] = field(default_factory=list)  # eval.fd_features (bench.evaluate.load_fd)

    @property
    def cache(self) -> Path:
        return Path(self.cfg.paths.cache)

    @property
    def device(self) -> torch.device:
        return self.settings.device

    def timed(self, stage: str, t0: float) -> None:
        self.results[K.STAGE_SECONDS][stage] = time.time() - t0


def env_info(device: torch.device) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()})"
    return {K.DEVICE: name, K.TORCH: torch.__version__, K.CUDA: torch.version.cuda if torch.cuda.is_available() else None,
            K.PYTHON: platform.python_version(), K.COMMIT: commit}


def _cached(cache: Path, stage: str, key: str) -> bool:
    return (cache / stage / key / MANIFEST).is_file()


def stage_keys(job: Job) -> dict[str, str]:
    """The cache keys of the job's stages, from its configuration and file list alone."""
    cfg, s = job.cfg, job.settings
    dkey, _, _, _ = data_key(cfg.data, s.files)
    tkey = tokens_key(s.tokenizer.content_key(dkey), s.tokens_options)
    rkey = reference_key(dkey, job.extractor.weights_sha256, s.eval)
    trkey = job_train_key(cfg, s, tkey)
    fd = fd_key_part(job.fds, dkey, s.eval)
    return {"data": dkey, "tokens": tkey, "reference": rkey, "baselines": baselines_key(tkey, rkey, s.eval, fd),
            "train": trkey, "eval": eval_key(cfg, s.prior_cls, trkey, rkey, s.precision, fd)}


def plan(job: Job) -> list[str]:
    """One line per stage: cached or to run, with the work it stands for (printed before any work)."""
    cfg, s = job.cfg, job.settings
    cache = job.cache
    _, train_files, val_files = s.files
    keys = stage_keys(job)
    dkey, tkey, rkey, bkey, trkey, ekey = (keys[k] for k in ("data", "tokens", "reference", "baselines", "train",
                                                             "eval"))
    e = s.eval
    n_ref = e.num_reference or len(train_files)
    rows = [
        ("data", "data", dkey, f"{len(train_files)} train / {len(val_files)} val images"
         + (" (a release: nothing is trained on them)" if s.release else
            f" ({len(s.selection)} of the train images held out for checkpoint selection)")),
        ("tokens", "tokens", tkey, f"tokenizer ({s.tokenizer.name}) and tokens of {len(train_files) + len(val_files)} images"
         + (f" (+ {len(train_files)} train images mirrored)" if s.tokens_options.hflip_train else "")),
        ("reference", "reference", rkey, f"Inception features of {min(n_ref, len(train_files))} train images"),
        ("baselines", "baselines", bkey, "real val images and reconstructions at each column's N"),
        ("train", "train", trkey, release_line(s.release, s.params) if s.release else
         f"{len(s.units)} model(s) x {cfg.train.steps} steps x batch {cfg.train.batch_size} ({s.params:,} parameters)"
         + (f", {s.unit_workers} at once" if s.unit_workers > 1 else "")),
        ("eval", "eval", ekey, f"{e.num_samples} samples, {e.completion_samples or len(val_files)} "
                               f"completions, NLL of {len(val_files)} val sequences, {e.bootstrap} "
                               "interval replicates"),
    ]
    last = {"plan": "eval", "tokens": "baselines", "train": "train", "all": "eval"}[cfg.stage]
    lines = []
    for stage, folder, key, work in rows:
        state = "cached" if _cached(cache, folder, key) else "runs"
        if stage == "train" and s.release is not None:
            state = "loads"  # nothing to cache: the release's files are its checkpoint
        lines.append(f"plan: {stage:<9} {state:<6} {work}")
        if stage == last:
            break
    return lines


def release_line(release: Release, params: int) -> str:
    """The plan's train line of a release: what is loaded instead of trained."""
    files = ", ".join(f"{name} (sha256 {sha[:12]})" for name, sha in release.files)
    return f"released {release.family} prior, {params:,} parameters, evaluated as released: {files}"


def memory_line(peak: memory.Peak) -> str:
    gib = 2 ** 30
    phase, need = peak.worst()
    return (f"memory: at least {peak.weights / gib:.1f} GiB weights and optimizer state + {peak.training / gib:.1f} "
            f"GiB training activations, {peak.sampling / gib:.1f} GiB sampling (KV cache, logits), "
            f"{peak.evaluation / gib:.1f} GiB evaluation; peak {need / gib:.1f} GiB in {phase} (lower bounds)")


def cost_plan(job: Job) -> C.Cost:
    """The job's cost (bench/cost.py) from its configuration and file counts alone, the prior built at n_embed
    codes (the effective codebook is at most that); the job's device peak measured in a fraction of a second."""
    cfg, s = job.cfg, job.settings
    if s.release is not None:
        prior = s.release.prior
    else:
        prior = build_prior_checked(cfg, s.tokenizer.codebook_size, s.tokenizer.grid, device="meta")  # shapes only
    _, train_files, val_files = s.files
    n_train, n_val = len(train_files), len(val_files)
    counts = {"n_train": n_train, K.N_VAL: n_val, K.N_REFERENCE: min(s.eval.num_reference or n_train, n_train),
              K.N_COMPLETIONS: min(s.eval.completion_samples or n_val, n_val)}
    counts["n_encoded"] = n_train * (2 if s.tokens_options.hflip_train else 1) + n_val
    own = (torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "this CPU",
           matmul_peak_flops(s.device, seconds=0.2))
    return C.estimate(prior, s.params, cfg, counts, int(cfg.data.resolution),
                      C.inception_flops_per_image(job.extractor), own, train=s.release is None,
                      codec=s.tokenizer.flops(), tokenizer_training=s.tokenizer.training_work())


def plan_warnings(cfg: DictConfig, settings: Settings) -> list[str]:
    """Legal but suspicious settings, one line each in the plan: usually a preset shrunk or grown in one
    option but not in the options tied to it."""
    t, e = cfg.train, settings.eval
    _, train_files, val_files = settings.files
    lines = []
    if 0 < int(t.warmup_steps) and int(t.warmup_steps) >= int(t.steps):
        lines.append(f"train.warmup_steps={t.warmup_steps} is not shorter than train.steps={t.steps}: the learning "
                     f"rate never reaches train.lr={t.lr} (set train.warmup_steps below the steps)")
    if e.completion_samples is not None and e.completion_samples > len(val_files):
        lines.append(f"eval.completion_samples={e.completion_samples} exceeds the {len(val_files)} val images: "
                     f"completion FID uses {len(val_files)}")
    n_ref = min(e.num_reference or len(train_files), len(train_files))
    if e.num_samples > n_ref:
        lines.append(f"eval.num_samples={e.num_samples} exceeds the reference's {n_ref} train images: FID and KID "
                     f"compare {e.num_samples} samples with {n_ref} real images")
    return lines


def data_stage(job: Job) -> ImageData:
    t0 = time.time()
    data = load_data(job.cfg.data, job.cache, job.settings.files)
    job.timed("data", t0)
    return data


def tokens_stage(job: Job, data: ImageData) -> TokenSet:
    t0 = time.time()
    tokens = build_tokens(job.settings.tokenizer, job.settings.tokens_options, data, job.cache, str(job.device))
    job.results[K.TOKENS_KEY] = tokens.key
    job.results[K.TOKENIZER] = {k: tokens.meta.get(k) for k in
                                ("vocab_size", "n_embed", "grid", "recon_psnr", "codebook_usage",
                                 "codebook_perplexity")}
    job.timed("tokens", t0)
    return tokens


@dataclass
class Reference:
    directory: Path
    key: str
    extractor: FE.FeatureExtractor
    fd: list[Any] = field(default_factory=list)  # bench.evaluate.fd_key_part of the extractors of eval.fd_features


def reference_stage(job: Job, data: ImageData) -> Reference:
    t0 = time.time()
    ref_dir, ref_key = build_reference(data, job.extractor, job.settings.eval, job.cache)
    build_fd_references(job.fds, data, job.settings.eval, job.cache)
    job.results[K.N_REFERENCE] = read_meta(ref_dir)["n"]
    job.timed("reference", t0)
    return Reference(ref_dir, ref_key, job.extractor, fd_key_part(job.fds, data.key, job.settings.eval))


def baselines_stage(job: Job, data: ImageData, tokens: TokenSet, ref: Reference) -> dict[str, Any]:
    """The table's two baseline rows at each column's N (cached once per tokens + reference + eval sizes)."""
    t0 = time.time()
    key = baselines_key(tokens.key, ref.key, job.settings.eval, ref.fd)
    d = build_baselines(key, data, tokens, ref.directory, ref.extractor, job.settings.eval, job.cache, job.fds)
    baselines = read_baselines(d)
    job.results[K.BASELINES] = baselines
    job.results[K.TOKENIZER][K.RECON_FID] = baselines[K.RECONSTRUCTION].get(K.FID)
    job.results[K.TOKENIZER][K.RECON_FID_N] = baselines[K.N_SAMPLES]
    job.logger.summary({f"{K.TOKENIZER}/{k}": v for k, v in job.results[K.TOKENIZER].items()})
    job.timed("baselines", t0)
    return baselines


def load_trained(prior: Prior, train_dir: Path) -> None:
    for unit, module in prior.units().items():
        path = train_dir / f"{unit}.pt"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("arch") != prior.arch_config() or ckpt.get("unit") != unit:
            raise ConfigError(f"checkpoint {path} was trained with a different prior configuration")
        module.load_state_dict(ckpt["state_dict"])


def split_for_selection(tokens: TokenSet, data: ImageData, train_files: list[str], selection: list[str]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the priors' training sequences, the selection sequences): the selection split's rows of the train tokens,
    and their left-right mirrors (tokenizer.hflip_train) kept out of training too."""
    n = len(data.train)
    rows = torch.tensor(selection_rows(train_files, data.meta.get("skipped", []), selection), dtype=torch.long)
    if len(rows) == 0 or len(rows) == n:
        raise ConfigError(f"data.selection_fraction: {len(rows)} of the {n} readable train images are in the "
                          "selection split; both it and the rest need at least one")
    held = torch.zeros(n, dtype=torch.bool)
    held[rows] = True
    fit = ~held.repeat(len(tokens.train) // n)  # train tokens: the n images, then their mirrors if any
    return tokens.train[fit], tokens.train[rows]


def train_stage(job: Job, tokens: TokenSet, data: ImageData) -> tuple[Prior, str]:
    t0 = time.time()
    cfg, s = job.cfg, job.settings
    torch.manual_seed(int(cfg.seed))  # the initial weights: the same seed gives the same run
    prior = build_prior_checked(cfg, tokens.vocab_size, tokens.grid).to(job.device)
    key = train_key(cfg, s.prior_cls, tokens.key, s.precision, s.selection)
    fit, select = split_for_selection(tokens, data, s.files[1], s.selection)
    job.results.update({K.N_TRAIN_SEQUENCES: len(fit), K.N_SELECTION: len(select),
                        K.SELECTION_FRACTION: float(cfg.data.selection_fraction),
                        K.SELECTION_SEED: int(cfg.data.selection_seed)})
    work = job.cache / "train" / f"{key}.work"

    def build(tmp: Path) -> dict[str, Any]:
        work.mkdir(parents=True, exist_ok=True)
        units = {}

        def save(unit: str, r: dict[str, Any]) -> None:
            atomic_torch_save({"arch": prior.arch_config(), "prior": prior.name, "unit": unit,
                               "state_dict": r["state_dict"], "best_val": r["best_val"],
                               "best_step": r["best_step"]}, tmp / f"{unit}.pt")
            units[unit] = {k: r[k] for k in ("best_val", "best_step", "seconds", "steps")}
            log.info("train: %s:%s done, best val %.4f bits/token at step %d", prior.name, unit, r["best_val"],
                     r["best_step"])

        t1 = time.time()
        train_units(prior, fit, select, s.train, int(cfg.seed), work, job.device, s.precision,
                    workers=s.unit_workers, threads=s.threads, log_fn=job.logger.log, on_done=save)
        units = {u: units[u] for u in prior.units()}  # the prior's order, whichever finished first
        return {K.PRIOR: prior.name, K.PARAMS: prior.num_params(), "units": units,
                K.TRAIN_SECONDS: sum(u["seconds"] for u in units.values()),
                K.TRAIN_WALL_SECONDS: time.time() - t1, K.UNIT_WORKERS: s.unit_workers,
                K.TRAIN_STEPS: s.train.steps}

    d = cached_stage(job.cache, "train", key, build, what=f"train {prior.name}")
    shutil.rmtree(work, ignore_errors=True)
    load_trained(prior, d)
    meta = read_meta(d)
    job.results.update({K.PARAMS: prior.num_params(), K.TRAIN_KEY: key, K.TRAIN_STEPS: meta[K.TRAIN_STEPS],
                        K.TRAIN_SECONDS: meta[K.TRAIN_SECONDS], K.TRAIN_WALL_SECONDS: meta.get(K.TRAIN_WALL_SECONDS),
                        K.TRAIN_UNITS: meta["units"], K.VALIDATION_NOTE: prior.validation_note})
    job.logger.best_validation({u: v["best_val"] for u, v in meta["units"].items()})
    job.timed("train", t0)
    return prior, key


def release_stage(job: Job, tokens: TokenSet) -> tuple[Prior, str]:
    """The train stage of a release: nothing to train; the release's files are the checkpoint it reports."""
    t0 = time.time()
    cfg, s = job.cfg, job.settings
    release = s.release
    if tokens.vocab_size != release.prior.vocab_size or tuple(tokens.grid) != tuple(release.prior.grid):
        raise ConfigError(f"the tokens ({tokens.vocab_size} codes, grid {tokens.grid[0]}x{tokens.grid[1]}) do not "
                          f"fit the released prior ({release.prior.vocab_size} codes, grid "
                          f"{release.prior.grid[0]}x{release.prior.grid[1]})")
    prior = release.prior.to(job.device)
    key = release_key(tokens.key, release)
    record = release_record(release, prior, cfg)
    log.info("train: nothing to train: %s", release_line(release, s.params))
    if record["differs"]:
        log.info("train: sampling differs from the release's paper in %s (paper: %s; this job: %s)",
                 ", ".join(record["differs"]), {k: record["paper_sampling"][k] for k in record["differs"]},
                 {k: record["sampling"].get(k) for k in record["differs"]})
    job.results.update({K.PARAMS: s.params, K.TRAIN_KEY: key, K.TRAIN_STEPS: 0, K.TRAIN_UNITS: {},
                        K.RELEASE: record})
    job.timed("train", t0)
    return prior, key


def eval_stage(job: Job, prior: Prior, tokens: TokenSet, ref: Reference, tkey: str) -> None:
    t0 = time.time()
    cfg, s = job.cfg, job.settings
    ekey = eval_key(cfg, s.prior_cls, tkey, ref.key, s.precision, ref.fd)
    # Finished parts of an interrupted evaluation (EVAL_PARTS): a rerun resumes from them.
    work = job.cache / "eval" / f"{ekey}.work"

    def build(tmp: Path) -> dict[str, Any]:
        ref_feats, ref_stats = load_reference(ref.directory)
        tok_model = load_tokenizer(job.cache / "tokenizer" / tokens.tokenizer_key, tokens.tokenizer, str(job.device))
        t1 = time.time()
        work.mkdir(parents=True, exist_ok=True)
        with StopFlag() as stop:
            def check_stop(part: str) -> None:
                if stop.signum is None:
                    return
                name = signal.Signals(stop.signum).name
                kept = [p for p in EVAL_PARTS if (work / f"{p}.pt").is_file()]
                what = f"finished parts ({', '.join(kept)}) kept in {work}" if kept else "no part finished yet"
                log.warning("%s during the evaluation of %s (%s): %s; the rerun resumes from them", name,
                            prior.name, part, what)
                raise Preempted(f"{name} during the evaluation of {prior.name} ({part}): {what}", stop.signum,
                                stop.previous(stop.signum))

            values, missing = evaluate_prior(prior, tokens, tok_model, ref.extractor, ref_feats, ref_stats, s.eval,
                                             int(cfg.seed), job.device, tmp, precision=s.precision, work=work,
                                             check_stop=check_stop, fds=job.fds)
        atomic_write_json(tmp / "metrics.json", {"values": values, K.UNAVAILABLE: missing})
        return {"eval_seconds": time.time() - t1}

    eval_dir = cached_stage(job.cache, "eval", ekey, build, what=f"eval {prior.name} T={cfg.T}")
    shutil.rmtree(work, ignore_errors=True)
    ev = json.loads((eval_dir / "metrics.json").read_text())
    job.results.update(ev["values"])
    job.results[K.UNAVAILABLE].update(ev[K.UNAVAILABLE])
    job.results[K.EVAL_DIR] = str(eval_dir)
    # Small per-job copies: the report rebuilds significance from the job folder, with or without the cache.
    for name in ("samples_grid.png", "completion_grid.png", "nll_per_sequence.npy"):
        if (eval_dir / name).is_file():
            shutil.copy2(eval_dir / name, job.dir / name)
            if name.endswith(".png"):
                job.logger.log_image(f"eval/{name[:-4]}", job.dir / name)
    job.timed("eval", t0)


def start_results(cfg: DictConfig) -> dict[str, Any]:
    r = empty_results()
    r.update({K.PRIOR: cfg.prior.name, K.T: cfg.T, K.SEED: cfg.seed, K.SWEEP_ID: cfg.sweep_id})
    return r


def plan_stage(job: Job) -> None:
    """Print the plan (stages cached or to run, warnings, cost, memory) and record the cost in the results."""
    settings = job.settings
    for line in plan(job):
        log.info(line)
    for line in plan_warnings(job.cfg, settings):
        log.warning("plan: warning: %s", line)
    cost = cost_plan(job)
    for line in cost.lines():
        log.info("plan: %s", line)
    if settings.peak is not None:
        log.info("plan: %s", memory_line(settings.peak))
        job.results[K.PLAN_MEMORY_BYTES] = settings.peak.worst()[1]
    if settings.memory_problem:
        log.warning("plan: warning: %s (this machine cannot run it)", settings.memory_problem)
    job.results.update(cost.as_results())


def run_job(cfg: DictConfig, job_dir: Path) -> dict[str, Any]:
    """Run one job to `cfg.stage`; always returns the results dict, written to job_dir/results.json.

    A failure (bad option before any work, or an error during it) gives status "failed" and a one-line
    `error`, so one bad point never takes a sweep down.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    results = start_results(cfg)
    t_job = time.time()
    job = None
    try:
        settings = validate(cfg)
        D.set_threads(settings.threads)
        results.update(env_info(settings.device))
        results.update({K.COMPUTE_PRECISION: settings.precision, K.THREADS: settings.threads,
                        K.UNIT_WORKERS: settings.unit_workers, K.T_APPLIES: settings.prior_cls.T_applies,
                        K.PRIOR_LABEL: (settings.prior_cls.label or settings.prior_cls.name)
                        + (" (released)" if settings.release else "")})
        extractor = FE.load_feature_extractor(settings.eval.inception_weights, device=str(settings.device))
        # The plan reads the FD extractors' weight files for its keys; it neither builds their networks nor downloads.
        fds = plan_fd(settings.eval) if cfg.stage == "plan" else load_fd(settings.eval, str(settings.device))
        job = Job(cfg, job_dir, settings, results, extractor, fds=fds)
        plan_stage(job)
        if cfg.stage == "plan":
            log.info("stage=plan: stopping before any stage")
            return finish(job, t_job)
        name, _ = prior_settings(cfg)
        job.logger = make_logger(cfg, job_dir, prior=name, T=cfg.T, seed=cfg.seed, config=container(cfg))

        data = data_stage(job)
        tokens = tokens_stage(job, data)
        ref = reference_stage(job, data)
        baselines_stage(job, data, tokens, ref)
        if cfg.stage == "tokens":
            log.info("stage=tokens: stopping after the shared tokens, reference features and baselines")
            return finish(job, t_job)
        prior, tkey = release_stage(job, tokens) if settings.release else train_stage(job, tokens, data)
        if cfg.stage == "train":
            log.info("stage=train: stopping after training")
            return finish(job, t_job)
        eval_stage(job, prior, tokens, ref, tkey)
        return finish(job, t_job)
    except Preempted:
        if job is not None:
            job.logger.finish(exit_code=1)
        raise
    except ConfigError as e:
        results.update({K.STATUS: "failed", K.ERROR: str(e).splitlines()[0] if str(e) else "invalid configuration",
                        K.ERROR_KIND: "config"})
        return finish(job, t_job, results, job_dir)
    except Exception as e:  # noqa: BLE001 - one failed job must not take the sweep down
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        results.update({K.STATUS: "failed", K.ERROR: msg, K.ERROR_KIND: "runtime",
                        K.TRACEBACK: traceback.format_exc()})
        log.error("job failed: %s\n%s", msg, results[K.TRACEBACK])
        return finish(job, t_job, results, job_dir)


def summary_line(r: dict[str, Any], path: Path) -> str:
    """The finished-job line of the log: status, main metrics and where the results are."""
    def show(key: str) -> str:
        v = r.get(key)
        if v is None:
            return "n/a"
        digits = KEYS[key].digits if key in KEYS else 3
        return f"{v:.{digits}f}"

    head = f"job done: prior={r.get(K.PRIOR)} T={r.get(K.T)} seed={r.get(K.SEED)} status={r.get(K.STATUS)}"
    if r.get(K.STATUS) != "ok":
        return f"{head} error={r.get(K.ERROR)} results={path}"
    return (f"{head} FID={show(K.FID)} KID={show(K.KID_MEAN)} NLL={show(K.NLL_BITS_PER_TOKEN)} "
            f"({r.get(K.NLL_KIND) or 'n/a'}) compl.FID={show(K.COMPLETION_FID)} s/img={show(K.SAMPLE_SECONDS_PER_IMAGE)} "
            f"results={path}")


def finish(job: Job | None, t_job: float, results: dict[str, Any] | None = None,
           job_dir: Path | None = None) -> dict[str, Any]:
    results = job.results if results is None else results
    job_dir = job.dir if job_dir is None else job_dir
    results[K.JOB_SECONDS] = time.time() - t_job
    path = job_dir / "results.json"
    atomic_write_json(path, results)
    log.info(summary_line(results, path))
    if job is not None:
        try:
            job.logger.finish_job(results, path)
        finally:
            job.logger.finish(exit_code=0 if results[K.STATUS] == "ok" else 1)
    return results
