"""Released checkpoints of the three prior families, loaded as the project's own priors and tokenizers.

A release is a prior together with the first stage it was trained on. Its loader reads the files as their authors
distribute them, checks every key and shape against the release's own config before building anything (a wrong
or truncated file is a one-line error naming the file and the first mismatching key), and maps the weights onto
the project's modules, so a released model runs through the same sampler, NLL and completion code as a prior
trained here. tools/release_fixtures.py makes parity fixtures with the official code; tests/ check each loader's
outputs against them.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from bench.cache import content_key
from priors.base import Prior

# family -> the conf/prior name of the prior its release loads as
FAMILIES: dict[str, str] = {"taming": "ar", "unleashing": "absorbing", "imagebart": "imagebart"}
# What each family's files are, for messages: option -> what it names
FILES: dict[str, dict[str, str]] = {
    "taming": {"ckpt": "the Net2NetTransformer checkpoint (checkpoints/last.ckpt)",
               "config": "its project.yaml (configs/*-project.yaml)"},
    "unleashing": {"ckpt": "the sampler's EMA weights (absorbing_ema_<step>.th)",
                   "first_stage": "the VQGAN's EMA weights (vqgan_ema_<step>.th)",
                   "config": "the hyperparameters: ffhq, churches, bedrooms or a YAML file of the authors' keys"},
    "imagebart": {"config": "a configs/sampling/*.yaml, or the list of per-scale configs (scale 1 first)",
                  "ckpt": "null with a sampling yaml, else the list of per-scale checkpoints (scale 1 first)"},
}
MISSING = (None, "", "???")


@dataclass(frozen=True)
class ReleaseOptions:
    """The top-level `release:` block (conf/config.yaml; set by conf/experiment/release_*.yaml): which released
    model a job evaluates, named by the files as their authors distribute them.

    family       taming | unleashing | imagebart: which loader reads the files
    ckpt         the prior's checkpoint (imagebart: per-scale list, or null when `config` is a sampling yaml)
    config       its configuration (unleashing: a released dataset's name or a YAML file of hyperparameters;
                 imagebart: a configs/sampling yaml or the per-scale list)
    first_stage  the first stage's weights where the prior's checkpoint does not hold them (unleashing's VQGAN;
                 imagebart: the VQGAN checkpoint when scale 1 holds none, default its config's ckpt_path)
    root         imagebart: the folder the configs' relative paths start from (the repository checkout holding
                 logs/ and data/); default: the config's folder
    """
    family: str
    ckpt: Any = None
    config: Any = None
    first_stage: str | None = None
    root: str | None = None

    @classmethod
    def from_config(cls, node: Mapping[str, Any], option: str = "release") -> "ReleaseOptions":
        """The block as given (a plain mapping, resolved); a one-line ValueError naming the first bad option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(f"{option}.{unknown[0]} is not a release option (known: {', '.join(sorted(known))})")
        family = node.get("family")
        if family not in FAMILIES:
            raise ValueError(f"{option}.family={family} is not one of: {', '.join(FAMILIES)} (use "
                             "experiment=release_<family>)")
        values = {k: (None if node.get(k) in MISSING else node.get(k)) for k in known}
        for name, what in FILES[family].items():
            if values[name] is None and not (family == "imagebart" and name == "ckpt"):
                raise ValueError(f"{option}.{name} is required for release.family={family}: {what}")
        for name in ("ckpt", "config"):
            v = values[name]
            if isinstance(v, (list, tuple)):
                if family != "imagebart":
                    raise ValueError(f"{option}.{name}: one file for release.family={family}, not a list")
                values[name] = tuple(str(p) for p in v)
            elif v is not None:
                values[name] = str(v)
        if family == "imagebart":
            ckpt, config = values["ckpt"], values["config"]
            if isinstance(config, tuple) != isinstance(ckpt, tuple):
                raise ValueError(f"{option}.ckpt and {option}.config: give a sampling yaml as config (ckpt null), "
                                 "or both as per-scale lists")
        for name in ("first_stage", "root"):
            if values[name] is not None:
                values[name] = str(values[name])
        return cls(**values)

    def paths(self) -> list[Path]:
        """The paths the options name (unleashing's config may be a dataset name instead; a sampling yaml's
        listed files are read by the loader)."""
        values = (self.ckpt, self.config, self.first_stage)
        return [Path(p).expanduser() for v in values for p in (v if isinstance(v, tuple) else (v,)) if p is not None]


@dataclass
class Release:
    """A loaded release: its prior and first stage (in eval mode on the CPU) and where they came from."""
    family: str
    prior: Prior
    # encode_to_indices: float images (B, 3, H, W) in [-1, 1] -> (B, h, w) ids in [0, vocab_size);
    # decode_indices: the inverse; `vocab_size`: the ids' range
    first_stage: nn.Module
    downsampling: int  # image side / token grid side
    resolution: int  # the image side the first stage was trained at
    files: list[tuple[str, str]]  # (file name, sha256) of every weights file read, the prior's first
    paper_sampling: dict[str, Any]  # the sampling settings the release's paper reports its numbers with
    notes: list[str] = field(default_factory=list)  # what the paper's setting means where ours cannot say it

    @property
    def prior_name(self) -> str:
        return FAMILIES[self.family]

    @property
    def key(self) -> str:
        """What the release's outputs depend on: its family and the content of its weights files."""
        return content_key("release-v1", self.family, [sha for _, sha in self.files])

    def grid_at(self, resolution: int) -> tuple[int, int]:
        side = resolution // self.downsampling
        return side, side

    def first_stage_flops(self) -> tuple[float, float]:
        """(encode, decode) FLOPs of one image at the release's resolution, counted on the meta device (no
        weights read, no arithmetic) where every op has a meta kernel."""
        if self.key not in _FLOPS:
            try:
                _FLOPS[self.key] = self._count(copy.deepcopy(self.first_stage).to("meta"), "meta")
            except (NotImplementedError, RuntimeError):
                # an op without a meta kernel (a remap's lookup of used codes): count one real image instead
                _FLOPS[self.key] = self._count(self.first_stage, "cpu")
        return _FLOPS[self.key]

    def _count(self, model: nn.Module, device: str) -> tuple[float, float]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, self.resolution, self.resolution, device=device)
        codes = torch.zeros(1, *self.grid_at(self.resolution), dtype=torch.long, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.encode_to_indices(x)
        encode = float(counter.get_total_flops())
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.decode_indices(codes)
        return encode, float(counter.get_total_flops())


_FLOPS: dict[str, tuple[float, float]] = {}  # Release.first_stage_flops by release key
# One load per process: the job's checks, its tokenizer and its prior share it (a released prior is GBs).
_LOADED: dict[tuple, Release] = {}


def _stamp(options: ReleaseOptions) -> tuple:
    """The options with each named file's size and mtime: a changed file is loaded (and hashed) again."""
    stats = []
    for p in options.paths():
        st = p.stat() if p.is_file() else None
        stats.append((str(p), None if st is None else (st.st_size, st.st_mtime_ns)))
    return options, tuple(stats)


def load_release(options: ReleaseOptions, option: str = "release") -> Release:
    """The release the options name, loaded once per process; a wrong, truncated or other-family file is a
    one-line ValueError/FileNotFoundError naming the option, the file and the first mismatching key."""
    stamp = _stamp(options)
    if stamp not in _LOADED:
        _LOADED.clear()  # one release per job: do not keep the previous one's weights alive
        _LOADED[stamp] = _LOADERS[options.family](options, option)
    return _LOADED[stamp]


def _load_taming(o: ReleaseOptions, option: str) -> Release:
    from releases import taming

    r = taming.load(o.ckpt, o.config, option)
    cfg = r.tokenizer.cfg
    return Release("taming", r.prior, r.tokenizer, 2 ** (len(cfg.ch_mult) - 1), cfg.resolution,
                   [(r.source, r.sha256)], dict(r.paper_sampling))


def _load_unleashing(o: ReleaseOptions, option: str) -> Release:
    from releases import unleashing

    r = unleashing.load(o.ckpt, o.first_stage, o.config, option)
    cfg = r.tokenizer.cfg
    return Release("unleashing", r.prior, r.tokenizer, cfg.img_size // cfg.latent_side, cfg.img_size,
                   list(zip(r.sources, r.sha256)), dict(r.paper_sampling),
                   ["the authors' sampler unmasks each masked token with probability 1/t at step t; ours reveals "
                    "evenly sized random groups (docs/releases.md)"])


def _load_imagebart(o: ReleaseOptions, option: str) -> Release:
    from releases import imagebart

    if isinstance(o.config, tuple):
        r = imagebart.load(list(o.ckpt), list(o.config), o.root, vqgan_ckpt=o.first_stage, option=option)
    else:
        if o.first_stage is not None:
            raise ValueError(f"{option}.first_stage: with a sampling yaml the first stage comes from its configs; "
                             "give per-scale lists to name another")
        r = imagebart.load_sampling_config(o.config, o.root, option=option)
    if r.tokenizer is None:
        raise ValueError(f"{option}.ckpt: scale 1's checkpoint holds no first stage and its config's ckpt_path is "
                         f"not a file; give the VQGAN checkpoint as {option}.first_stage")
    files = list(zip(r.sources, r.sha256)) + ([r.first_stage_file] if r.first_stage_file else [])
    cfg = r.tokenizer.cfg
    return Release("imagebart", r.prior, r.tokenizer, 2 ** (len(cfg.ch_mult) - 1), cfg.resolution, files,
                   dict(r.paper_sampling, top_k=r.top_k))


_LOADERS = {"taming": _load_taming, "unleashing": _load_unleashing, "imagebart": _load_imagebart}
