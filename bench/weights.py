"""Third-party weights that priorbench fetches only when asked: never on the default path.

Networks need weights that no package ships: torch-fidelity's Inception with its logits layer (the Inception
Score), torchvision's VGG16 (the backbone of LPIPS, taming's perceptual loss) and the DINOv2 and CLIP extractors of
Frechet distances beside FID (eval.fd_weights, one value per extractor). Each has one option:

    null       use torch's hub cache copy if it is there, else go without (IS / LPIPS unavailable, with the reason)
    download   fetch the file its authors publish into torch's hub cache (TORCH_HOME), once
    URL        fetch that http(s) URL instead (a mirror); its file name must carry the sha256 prefix, as the
               authors' files do (`...-6726825d.pth`)
    PATH       a local copy of the file

Every fetched file is checked against the sha256 prefix in its name (torch.hub's convention, torch.hub's
download; a `Weights.hub_name` carries a hash pinned where the published URL's name has none, as torch-fidelity's
CLIP names do), written atomically, and reused afterwards. Anything that goes wrong is one line naming the option.
"""
from __future__ import annotations

import os
import shutil
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from bench.cache import file_sha256
from bench.errors import ConfigError

DOWNLOAD = "download"


@dataclass(frozen=True)
class Weights:
    option: str  # the config option that names the file
    url: str  # where its authors publish it
    what: str  # what it is, for messages
    hub_name: str = ""  # its name in torch's hub cache when not the URL's (it then carries the pinned sha256)

    @property
    def file_name(self) -> str:
        return self.hub_name or os.path.basename(self.url)


def hub_checkpoints() -> Path:
    """torch's hub cache folder for weight files (TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_prefix(name: str) -> str | None:
    """The sha256 prefix a weights file name carries (`vgg16-397923af.pth` -> 397923af), or None."""
    m = torch.hub.HASH_REGEX.search(os.path.basename(name))
    return m.group(1) if m and len(m.group(1)) >= 8 else None


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def fetch(url: str, weights: Weights, value: str, name: str | None = None, download: bool = True) -> Path:
    """The file at `url` in torch's hub cache as `name` (default: the URL's file name): downloaded once (checked
    against the sha256 prefix the name carries, atomic, under a lock), then reused. download=False: where it is or
    would be, nothing fetched."""
    name = name or os.path.basename(url)
    prefix = sha256_prefix(name)
    if prefix is None:
        raise ConfigError(f"{weights.option}={value}: the file name {name!r} carries no sha256 prefix "
                          f"(as in {weights.file_name}); download it yourself and pass {weights.option}=PATH")
    dest = hub_checkpoints() / name
    if not download:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_file():
            return dest
        try:
            torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=False)
        except urllib.error.URLError as e:
            reason = getattr(e, "reason", None) or e
            raise ConfigError(f"{weights.option}={value}: could not download {url} ({reason}); put the file at "
                              f"{dest} or pass {weights.option}=PATH") from e
        except RuntimeError as e:  # torch.hub's hash check
            raise ConfigError(f"{weights.option}={value}: {url} is not the file its name promises "
                              f"(sha256 does not start with {prefix}); nothing was kept") from e
        except OSError as e:
            raise ConfigError(f"{weights.option}={value}: could not write {dest} ({e.strerror or e})") from e
    return dest


def resolve(value: str | os.PathLike | None, weights: Weights, download: bool = True) -> Path | None:
    """The weights file an option names (see the module docstring); None when absent and not asked for.
    download=False (a plan): `download` and URLs give the hub-cache path the file has or would have, which need not
    exist yet; nothing is fetched."""
    if value is None:
        cached = hub_checkpoints() / weights.file_name
        return cached if cached.is_file() else None
    text = str(value)
    if text == DOWNLOAD:
        return fetch(weights.url, weights, text, weights.file_name, download=download)
    if is_url(text):
        return fetch(text, weights, text, download=download)
    path = Path(os.path.expanduser(text))
    if not path.is_file():
        raise ConfigError(f"{weights.option}={text}: no such file ({weights.what}, e.g. {weights.file_name}; "
                          f"or {weights.option}={DOWNLOAD})")
    return path


def place_in_hub(path: Path, weights: Weights) -> Path:
    """A local copy of a file that a library looks up by name in torch's hub cache (torchvision's VGG16 for
    LPIPS): checked against the sha256 prefix of the published name, then copied there (atomically)."""
    dest = hub_checkpoints() / weights.file_name
    if path.resolve() == dest.resolve():
        return dest
    want = sha256_prefix(weights.file_name)
    got = file_sha256(path)
    if want and not got.startswith(want):
        raise ConfigError(f"{weights.option}={path}: not {weights.file_name} (sha256 {got[:8]}..., "
                          f"expected {want}...)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + f".tmp{os.getpid()}")
    shutil.copyfile(path, tmp)
    os.replace(tmp, dest)
    return dest
