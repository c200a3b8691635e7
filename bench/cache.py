"""Content-keyed, atomic, lock-guarded stage caches (docs/design.md, "Stages and caches").

Every stage writes into `<paths.cache>/<stage>/<key>/`. A stage directory is
built under a temporary name and renamed into place only once every file is
written, with a `MANIFEST.json` that records each file's size and sha256. A
directory without a valid manifest (killed job, truncated or corrupt file) is
treated as absent, reported by name, and rebuilt. Creation is guarded by a file
lock so parallel jobs (joblib, SLURM arrays) build a shared artifact once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from bench.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_folder(path: Path, option: str, value: Any) -> None:
    """A folder the job will create or write into: refuse, before any work, a file in the way or a parent that
    cannot be written (one line naming the option)."""
    p = Path(path)
    existing = next(q for q in (p, *p.parents) if q.exists() or q == q.parent)
    if not existing.is_dir():
        raise ConfigError(f"{option}={value}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={value}: cannot write into {existing} (permission denied)")


def move_aside(path: Path) -> Path:
    """Rename a resumable file that cannot be read to `<name>.unreadable` (kept for inspection, out of the way of
    the rerun that recomputes it); returns the new path."""
    aside = path.with_name(f"{path.name}.unreadable")
    os.replace(path, aside)
    return aside


def with_path(e: BaseException, path: Path) -> BaseException:
    """A write error that names no file (a full disk: errno 28, a quota) as one that names `path`; others as
    they are. Without it the job's one-line error would not say which disk is full."""
    if isinstance(e, OSError) and e.errno is not None and e.filename is None:
        return OSError(e.errno, e.strerror, str(path))
    return e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise with_path(e, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_manifest(directory: Path, meta: dict[str, Any] | None = None) -> None:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    atomic_write_json(directory / MANIFEST, {"files": files, "meta": meta or {}})


def verify(directory: Path) -> str | None:
    """None when the directory is complete and intact, else a one-line reason."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (unfinished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, info in files.items():
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != info["size"]:
            return f"{rel} is truncated ({p.stat().st_size} of {info['size']} bytes)"
        if file_sha256(p) != info["sha256"]:
            return f"{rel} is corrupt (sha256 mismatch)"
    return None


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())["meta"]


def cached_stage(root: Path, stage: str, key: str, build: Callable[[Path], dict[str, Any] | None],
                 what: str | None = None) -> Path:
    """Return `<root>/<stage>/<key>`, building it with `build(tmp_dir) -> meta` unless already done.

    `build` writes its files into the temporary directory it is given and
    returns the meta stored in the manifest.
    """
    what = what or stage
    final = Path(root) / stage / key
    if final.is_dir() and verify(final) is None:
        log.info("%s: reusing cache %s", what, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            problem = verify(final)
            if problem is None:
                log.info("%s: reusing cache %s (built by a parallel job)", what, final)
                return final
            log.warning("%s: cache %s is invalid: %s; rebuilding it", what, final, problem)
            shutil.rmtree(final)
        # Under the lock, temporary folders of this key can only be left by killed builds.
        for stale in final.parent.glob(f".{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}.tmp-"))
        try:
            meta = build(tmp) or {}
            write_manifest(tmp, meta)
            os.replace(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise with_path(e, final)
    log.info("%s: built %s", what, final)
    return final
