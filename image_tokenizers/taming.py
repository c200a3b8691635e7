"""A released taming-transformers VQGAN (paper scale), e.g. the f16 ImageNet/FFHQ checkpoints: `tokenizer=taming`.

The architecture is read from the release's project.yaml (model.params.ddconfig, n_embed, embed_dim) and the
checkpoint is loaded with torch.load(weights_only=True); it must match the yaml key for key (loss.* ignored).
Nothing is trained: the tokenizer stage records which checkpoint its key stands for.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from bench.cache import content_key
from image_tokenizers.vqmodel import VQGANConfig, VQModel, VQModelTokenizer


@dataclass
class TamingOptions:
    """conf/tokenizer/taming.yaml: the release's two files."""
    ckpt: str  # Lightning checkpoint (last.ckpt) holding `state_dict`
    config: str  # its taming project.yaml


class TamingTokenizer(VQModelTokenizer):
    name = "taming"
    Options = TamingOptions

    def __init__(self, options: TamingOptions, config: Any, resolution: int):
        super().__init__(options, config, resolution)
        for opt in ("ckpt", "config"):
            if getattr(options, opt) in ("", "???"):
                raise ValueError(f"tokenizer.{opt} is required for tokenizer=taming")
        self.ckpt = Path(options.ckpt).expanduser()
        self.project = Path(options.config).expanduser()
        self._model_config: VQGANConfig | None = None

    @property
    def model_config(self) -> VQGANConfig:
        if self._model_config is None:
            self._model_config = config_from_taming_yaml(str(self.project))
        return self._model_config

    def check(self) -> None:
        for opt, path in (("ckpt", self.ckpt), ("config", self.project)):
            if not path.is_file():
                raise ValueError(f"tokenizer.{opt}={getattr(self.options, opt)}: file not found")
        # Loading is the only way to know the checkpoint matches its config; it is cheap next to encoding.
        try:
            load_taming_vqgan(str(self.ckpt), str(self.project))
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(msg if msg.startswith("tokenizer.") else f"tokenizer.ckpt={self.options.ckpt}: {msg}"
                             ) from None

    def content_key(self, data_key: str) -> str:
        ckpt, conf = self.ckpt.resolve(), self.project.resolve()
        st = ckpt.stat()
        # Path, size and mtime stand in for the content of a multi-GB checkpoint.
        return content_key("tokenizer-taming-v1", data_key, str(ckpt), st.st_size, st.st_mtime_ns, conf.read_text())

    def build(self, images: torch.Tensor, directory: Path, work: Path, device: str,
              log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
        return {"name": self.name, "ckpt": self.options.ckpt, "config": self.options.config}

    def load(self, directory: Path, device: str) -> None:
        self.use(load_taming_vqgan(str(self.ckpt), str(self.project)), device)


# taming's VQModel target; other first stages (GumbelVQ, EMAVQModel, KL autoencoders) have other weights
TAMING_TARGETS = ("taming.models.vqgan.VQModel",)


def read_yaml(path: str, option: str) -> Any:
    """A YAML file as an OmegaConf node; a missing file or bad YAML is a one-line error naming `option`."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}={path}: file not found")
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        reason = getattr(e, "problem", None) or e
        raise ValueError(f"{option}={path}: not valid YAML{at} ({reason})") from None


def config_from_taming_yaml(config_path: str) -> VQGANConfig:
    """model.params of a taming project.yaml -> VQGANConfig."""
    return config_from_taming_model(read_yaml(config_path, "tokenizer.config").get("model"),
                                    f"tokenizer.config={config_path}")


def config_from_taming_model(model: Any, where: str) -> VQGANConfig:
    """A taming VQModel's config node (target + params, as under `model:` of its project.yaml or under
    `first_stage_config:` of a transformer's) -> VQGANConfig; `where` names it in errors."""
    if model is None or model.get("params") is None or model.params.get("ddconfig") is None:
        raise ValueError(f"{where} has no model.params.ddconfig (not a taming project.yaml)")
    target = model.get("target")
    if target is not None and target not in TAMING_TARGETS:
        raise ValueError(f"{where}: model.target={target} is not {TAMING_TARGETS[0]}")
    p, dd = model.params, model.params.ddconfig
    try:
        return VQGANConfig(
            resolution=int(dd.resolution), in_channels=int(dd.get("in_channels", 3)), out_ch=int(dd.get("out_ch", 3)),
            ch=int(dd.ch), ch_mult=tuple(dd.ch_mult), num_res_blocks=int(dd.num_res_blocks),
            attn_resolutions=tuple(dd.attn_resolutions), z_channels=int(dd.z_channels),
            embed_dim=int(p.embed_dim), n_embed=int(p.n_embed), dropout=float(dd.get("dropout", 0.0)),
            # taming's Encoder defaults to double_z=True when the yaml omits it
            double_z=bool(dd.get("double_z", True)),
            remap=p.get("remap"), unknown_index=p.get("unknown_index", "random"))
    except Exception as e:  # missing keys in the yaml, bad values
        raise ValueError(f"{where}: {e}") from None


def load_taming_vqgan(ckpt_path: str, config_path: str) -> VQModel:
    """A released taming-transformers VQGAN (`last.ckpt` + `project.yaml`) as a VQModel in eval mode.
    Keys under `loss.` (LPIPS, discriminator) are ignored."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"tokenizer.ckpt={ckpt_path}: file not found")
    cfg = config_from_taming_yaml(config_path)
    sd = read_lightning_state_dict(ckpt_path, "tokenizer.ckpt")
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    return taming_vqgan_from_state_dict(sd, cfg, f"tokenizer.ckpt={ckpt_path} does not match "
                                                 f"tokenizer.config={config_path}")


def taming_vqgan_from_state_dict(sd: dict[str, torch.Tensor], cfg: VQGANConfig, mismatch: str) -> VQModel:
    """The VQModel of `cfg` holding the weights `sd` (taming's key names), in eval mode; a missing, extra or
    misshapen key is a one-line ValueError starting with `mismatch`."""
    expected = vqgan_keys(cfg)
    if "quantize.used" in sd:  # remap baked into the checkpoint: the npy of the yaml must agree
        if cfg.remap is None:
            raise ValueError(f"{mismatch}: unexpected key quantize.used (the yaml has no remap)")
        expected["quantize.used"] = tuple(np.load(cfg.remap).shape)
    check_keys(sd, expected, mismatch)
    model = VQModel(cfg)
    model.load_state_dict(sd, strict=cfg.remap is None or "quantize.used" in sd)
    return model.eval()


def vqgan_keys(cfg: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the VQModel of cfg without a remap (taming's names), in module order."""
    with torch.device("meta"):  # no point initialising 70M weights only to read their shapes
        probe = VQModel(VQGANConfig(**{**cfg.__dict__, "remap": None}))
    return {k: tuple(v.shape) for k, v in probe.state_dict().items()}


def check_keys(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], mismatch: str) -> None:
    """sd holds exactly the keys of `expected`, each with its shape; else a one-line ValueError naming the first
    mismatching key (missing or misshapen ones in `expected`'s order, then extra ones in sorted order)."""
    for k, shape in expected.items():
        if k not in sd:
            raise ValueError(f"{mismatch}: missing key {k}")
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"{mismatch}: {k} has shape {tuple(sd[k].shape)}, config gives {tuple(shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise ValueError(f"{mismatch}: unexpected key {extra[0]}")


def read_lightning_state_dict(path: str, option: str) -> dict[str, torch.Tensor]:
    """The state_dict of a PyTorch Lightning 1.x checkpoint (or of a bare state-dict file), read safely.

    The checkpoint is read with weights_only=True: no pickled code runs. Lightning checkpoints also hold plain
    metadata (epoch, global_step, optimizer states, callbacks); anything beyond tensors and containers must be on
    the allow-list of _lightning_safe_globals or loading fails, with one line naming `option`; so does a missing
    file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}={path}: file not found")
    try:
        with torch.serialization.safe_globals(_lightning_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{option}={path} cannot be loaded safely (weights_only=True): "
                         f"{_load_error_reason(e)}") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{option}={path} holds no state_dict")
    return sd


def _load_error_reason(e: Exception) -> str:
    """One line out of torch.load's multi-paragraph error: the refused global when there is one."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if m:
        return f"it holds the non-allow-listed global {m.group(1)} (pickled code or an unknown class)"
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    if m:
        # Not the advice to load with weights_only=False that torch's message leads with: bytes that are no
        # checkpoint (random, another format) fail here too, and running their pickle would be the wrong fix.
        return f"not a PyTorch checkpoint, or a damaged one ({m.group(1).strip()})"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class LightningModelCheckpointKey:
    """Stand-in for the `ModelCheckpoint` class that Lightning 1.0-1.4 uses as a dict key under `callbacks`.

    The class is only referenced (a pickle GLOBAL), never instantiated, so mapping its name to this
    inert class lets weights_only=True read the checkpoint without pytorch_lightning installed."""


def _lightning_safe_globals() -> list:
    """The non-tensor globals of a taming (PyTorch Lightning 1.x) checkpoint, all data and no code.

    Everything else (arbitrary classes, functions) is still refused by weights_only=True."""
    try:  # numpy scalars, e.g. a logged best score; numpy 2 moved numpy.core to numpy._core
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar

    allowed: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]  # numpy.dtypes.*
    allowed += [(LightningModelCheckpointKey, f"pytorch_lightning.callbacks.{m}ModelCheckpoint")
                for m in ("model_checkpoint.", "")]
    return allowed
