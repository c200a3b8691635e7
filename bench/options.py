"""The harness's own config groups (train, eval, data) as dataclasses, checked before any work.

Built by the same `options_from` as a prior's and the tokenizer's options: an unknown key (`+train.stepz=5`)
or a value of the wrong type (`train.lr=abc`) is a one-line ConfigError naming the option, and each
dataclass checks its ranges in __post_init__. A field here is an option of the group's yaml, with the yaml's
default. The evaluation reads its EvalConfig; the other stages read their checked groups of the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.errors import ConfigError
from priors.options import options_from


def at_least(option: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ValueError(f"{option}={value} must be at least {minimum}")


def at_most_samples(option: str, value: int, minimum: int, cap: int) -> None:
    at_least(option, value, minimum)
    if value > cap:
        raise ValueError(f"{option}={value} exceeds {cap}; raise eval.max_samples if this is intended")


def finite_in(option: str, value: float, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> None:
    """low <= value <= high (or < at an open end), and finite: inf and nan are refused too."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{option}={value} must lie in {interval}")


COMPILE_MODES = ("auto", "off", "on")  # eval.compile (bench.evaluate.resolve_compile)


@dataclass
class EvalConfig:
    """conf/eval/default.yaml: the evaluation protocol (sizes, seeds, metric settings), built and checked once per
    job (bench.pipeline.validate); the evaluation reads its fields, never the raw config."""
    num_samples: int = 250  # generated samples for FID / KID / IS / PRDC
    batch_size: int = 50  # sampling batch
    compile: str = "auto"  # sampling path: auto | off | on
    feature_batch_size: int = 64  # images per Inception forward
    inception_weights: str | None = None  # null, download, a URL or a PATH (bench/weights.py)
    num_reference: int | None = 1000  # reference train images; null: all
    split_seed: int = 0  # seed of the protocol's random draws
    bootstrap: int = 200  # replicates per interval (subsets or resamples, docs/protocol.md) for the intervals and tests
    max_samples: int = 1_000_000  # typo guard on num_samples / completion_samples
    prdc_k: int = 5  # PRDC nearest neighbours
    prdc_samples: int = 10000  # at most this many samples per side for PRDC and KID
    isc_splits: int = 10  # IS splits
    completion_samples: int | None = 150  # val images for completion FID; null: all
    match_samples: int | None = None  # samples compared with every training grid; null: all
    nll_batches: int | None = None  # validation batches for the NLL; null: all
    fd_features: list = field(default_factory=list)  # torch-fidelity extractors for Frechet distances beside FID
    fd_weights: dict | None = None  # {extractor: null, download, a URL or a PATH}; null: none named

    def __post_init__(self) -> None:
        self.check_fd()
        at_least("eval.split_seed", self.split_seed, 0)  # numpy refuses negative seeds, after the tokenizer
        at_least("eval.isc_splits", self.isc_splits, 1)
        # KID's unbiased estimate needs two samples per side; PRDC's k-th neighbour needs k others.
        if self.prdc_samples < max(2, self.prdc_k + 1):
            raise ValueError(f"eval.prdc_samples={self.prdc_samples} must be at least eval.prdc_k + 1 = "
                             f"{max(2, self.prdc_k + 1)} (KID and PRDC are computed on that many samples)")
        at_least("eval.max_samples", self.max_samples, 2)
        # FID-type statistics need two rows; the caps catch a count with zeros too many before any work.
        at_most_samples("eval.num_samples", self.num_samples, 2, self.max_samples)
        at_least("eval.batch_size", self.batch_size, 1)
        at_least("eval.feature_batch_size", self.feature_batch_size, 1)
        if self.completion_samples is not None:
            at_most_samples("eval.completion_samples", self.completion_samples, 2, self.max_samples)
        if self.num_reference is not None:
            at_least("eval.num_reference", self.num_reference, 2)
        at_least("eval.bootstrap", self.bootstrap, 2)
        at_least("eval.prdc_k", self.prdc_k, 1)
        if self.nll_batches is not None:
            at_least("eval.nll_batches", self.nll_batches, 1)
        if self.match_samples is not None:
            at_least("eval.match_samples", self.match_samples, 1)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"eval.compile={self.compile} is not one of: {', '.join(COMPILE_MODES)}")

    def check_fd(self) -> None:
        """eval.fd_features: names of bench.keys.FD_KEYS, each once (one name alone is taken as a list of one);
        eval.fd_weights: a mapping from those names to null or a string (null: {})."""
        from bench.keys import FD_KEYS

        choices = ", ".join(FD_KEYS)
        names = [self.fd_features] if isinstance(self.fd_features, str) else self.fd_features
        if not isinstance(names, (list, tuple)):
            raise ValueError(f"eval.fd_features={self.fd_features!r}: expected a list of extractor names "
                             f"(choices: {choices})")
        for name in names:
            if name not in FD_KEYS:
                raise ValueError(f"eval.fd_features: unknown extractor {name!r} (choices: {choices})")
        if len(set(names)) != len(names):
            raise ValueError(f"eval.fd_features={list(names)}: an extractor is listed twice")
        self.fd_features = list(names)
        if self.fd_weights is None:
            self.fd_weights = {}
        if not isinstance(self.fd_weights, dict):
            raise ValueError(f"eval.fd_weights={self.fd_weights!r}: expected a mapping {{extractor: null, download, "
                             "a URL or a PATH}")
        for name, value in self.fd_weights.items():
            if name not in FD_KEYS:
                raise ValueError(f"eval.fd_weights.{name}: unknown extractor (choices: {choices})")
            if value is not None and not isinstance(value, str):
                raise ValueError(f"eval.fd_weights.{name}={value!r}: expected null, download, a URL or a PATH")


@dataclass
class DataOptions:
    """conf/data/*.yaml: the images and their split."""
    kind: str = "emoji"  # emoji | folder
    resolution: int = 32  # images are resized to resolution x resolution
    val_fraction: float = 0.1  # share held out by the hash split
    selection_fraction: float = 0.1  # share of the train split held out for checkpoint selection
    selection_seed: int = 0  # which train groups the selection split takes
    limit: int | None = None  # at most this many images; null: all
    path: str | None = None  # data=folder: the image folder
    train_list: str | None = None  # text files of paths relative to data.path
    val_list: str | None = None

    def __post_init__(self) -> None:
        at_least("data.resolution", self.resolution, 1)
        finite_in("data.val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        finite_in("data.selection_fraction", self.selection_fraction, 0, 1, low_open=True, high_open=True)
        at_least("data.selection_seed", self.selection_seed, 0)
        if self.limit is not None:
            at_least("data.limit", self.limit, 1)  # the split's own check asks for two train and two val images


@dataclass
class BudgetOptions:
    """config.yaml `budget:`: what every prior gets."""
    params: int = 400000  # trainable transformer parameters per prior (ImageBART: split over its scales)


@dataclass
class PathsOptions:
    """config.yaml `paths:`: where the job writes (checked as folders by the job and the sweep)."""
    cache: str = "./cache"  # shared stage caches
    reports: str = "./reports"  # reports/<name>/ of a sweep


@dataclass
class WandbOptions:
    """conf/logger/wandb.yaml `wandb:` (its mode is checked by bench.logger)."""
    mode: str = "offline"
    project: str = "priorbench"
    entity: str | None = None
    dir: str | None = None
    tags: list = field(default_factory=list)


# ---- train: the TrainConfig every job builds once (bench.pipeline.validate) and the training loop reads ----

@dataclass
class TrainConfig:
    """conf/train/default.yaml: the training loop every model (ImageBART: every scale) runs. The yaml holds the
    values (the one place they are set); a config without one of them is refused by options_from."""
    steps: int  # optimizer steps per model
    batch_size: int  # sequences per step
    lr: float  # peak AdamW learning rate
    weight_decay: float  # AdamW weight decay of the matrices
    betas: list  # AdamW (beta1, beta2)
    warmup_steps: int  # linear warm-up, then cosine decay
    min_lr_ratio: float  # the cosine ends at lr * min_lr_ratio
    grad_clip: float  # global gradient-norm clip
    ema_decay: float  # EMA of the weights (the evaluated ones)
    val_every: int  # validation NLL every N steps
    val_batches: int  # validation batches per check
    ckpt_every: int  # resumable checkpoint every N steps

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "val_batches", "ckpt_every"):
            at_least(f"train.{name}", getattr(self, name), 1)
        at_least("train.warmup_steps", self.warmup_steps, 0)
        finite_in("train.lr", self.lr, 0, math.inf, low_open=True, high_open=True)
        finite_in("train.weight_decay", self.weight_decay, 0, math.inf, high_open=True)
        finite_in("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        finite_in("train.grad_clip", self.grad_clip, 0, math.inf, low_open=True, high_open=True)
        # 1 would freeze the EMA at the initial weights; above 1 it diverges (the evaluated weights explode).
        finite_in("train.ema_decay", self.ema_decay, 0, 1, high_open=True)
        betas = self.betas
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
            raise ValueError(f"train.betas={betas!r}: expected two numbers [beta1, beta2]")
        for b in betas:
            if not (math.isfinite(b) and 0 <= b < 1):
                raise ValueError(f"train.betas={list(betas)}: each beta must lie in [0, 1)")
        self.betas = [float(b) for b in betas]


def train_config(cfg: Any) -> TrainConfig:
    """The job's TrainConfig from its `train` group; a missing, unknown, mistyped or out-of-range option is a
    one-line ConfigError naming it."""
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in cfg]
    if missing:
        raise ConfigError(f"train.{missing[0]} is required (conf/train/default.yaml sets it)")
    return group_options(TrainConfig, cfg, "train")


CONF = Path(__file__).resolve().parent.parent / "conf"
# Keys of the composed config that are not in config.yaml itself: the config groups and the W&B block.
GROUP_KEYS = ("prior", "data", "tokenizer", "train", "eval", "logger", "wandb")


def top_level_keys() -> list[str]:
    return [k for k in OmegaConf.load(CONF / "config.yaml") if k not in ("defaults", "hydra")] + list(GROUP_KEYS)


def check_top_level(cfg: DictConfig) -> None:
    """Keys added with `+KEY=VALUE` outside any group (`+seeds=3`) and the small blocks budget, paths, wandb."""
    known = top_level_keys()
    for key in cfg:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"{key} is not an option (options: {', '.join(known)})"
                              + (f"; did you mean {near[0]}?" if near else ""))
    for block, cls in (("budget", BudgetOptions), ("paths", PathsOptions), ("wandb", WandbOptions)):
        if block in cfg:
            fields = {f.name for f in dataclasses.fields(cls)}
            for key in cfg[block]:
                if key not in fields:
                    near = difflib.get_close_matches(str(key), sorted(fields), n=1)
                    raise ConfigError(f"{block}.{key} is not an option of {block} (options: "
                                      f"{', '.join(f.name for f in dataclasses.fields(cls))})"
                                      + (f"; did you mean {block}.{near[0]}?" if near else ""))


def group_choice(group: str) -> str:
    """The group's option as chosen on the command line (train=default), for messages."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group) or "default")
    except ValueError:  # no Hydra run (tests call validate directly)
        return "default"


def group_options(cls: type, cfg: Any, group: str) -> Any:
    mapping = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if group == "data" and mapping.get("path") == "???":
        mapping["path"] = None  # data=emoji has no folder; data=folder's own check names a missing one
    try:
        return options_from(cls, mapping, group, owner=group_choice(group), group=group)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        unknown = [k for k in mapping if k not in {f.name for f in dataclasses.fields(cls)}]
        near = difflib.get_close_matches(unknown[0], [f.name for f in dataclasses.fields(cls)], n=1) if unknown else []
        raise ConfigError(f"{msg}; did you mean {group}.{near[0]}?" if near else msg) from None


def eval_config(cfg_eval: Any) -> EvalConfig:
    """The job's EvalConfig from its `eval:` group: unknown keys, types and ranges as one-line ConfigErrors."""
    return group_options(EvalConfig, cfg_eval, "eval")


def check_groups(cfg: DictConfig) -> tuple[TrainConfig, EvalConfig, DataOptions]:
    """train, eval and data: unknown keys, types and ranges; unknown keys elsewhere; before any work."""
    check_top_level(cfg)
    return (train_config(cfg.train), eval_config(cfg.eval),
            group_options(DataOptions, cfg.data, "data"))
