"""The stage cache: content keys, atomic build-once, corruption detection, and cross-process locking."""
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from bench.cache import cached_stage, content_key, verify


def test_content_key_is_stable_and_order_independent():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})
    assert len(content_key("x")) == 16


def _builder(calls):
    def build(tmp: Path):
        calls.append(1)
        (tmp / "a.bin").write_bytes(b"x" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("hello")
        return {"n": 7}
    return build


def test_built_once_then_reused(tmp_path, caplog):
    calls = []
    caplog.set_level(logging.INFO)
    d1 = cached_stage(tmp_path, "stage", "k1", _builder(calls))
    d2 = cached_stage(tmp_path, "stage", "k1", _builder(calls))
    assert d1 == d2 == tmp_path / "stage" / "k1"
    assert len(calls) == 1
    assert "reusing cache" in caplog.text
    assert verify(d1) is None
    # No temporary directories are left behind.
    assert sorted(p.name for p in (tmp_path / "stage").iterdir() if p.is_dir()) == ["k1"]


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete", "manifest"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, damage):
    calls = []
    d = cached_stage(tmp_path, "stage", "k", _builder(calls))
    f = d / "a.bin"
    if damage == "truncate":
        f.write_bytes(b"x" * 10)
    elif damage == "corrupt":
        f.write_bytes(b"y" * 1000)
    elif damage == "delete":
        f.unlink()
    else:
        (d / "MANIFEST.json").write_text("{not json")
    assert verify(d) is not None
    caplog.set_level(logging.WARNING)
    cached_stage(tmp_path, "stage", "k", _builder(calls))
    assert len(calls) == 2
    assert "invalid" in caplog.text and str(d) in caplog.text
    assert verify(d) is None and (d / "a.bin").read_bytes() == b"x" * 1000


def test_failed_build_leaves_nothing(tmp_path):
    def boom(tmp):
        (tmp / "partial").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_stage(tmp_path, "stage", "k", boom)
    assert not (tmp_path / "stage" / "k").exists()
    assert [p for p in (tmp_path / "stage").iterdir() if p.is_dir()] == []


def _slow_build_worker(root, counter):
    def build(tmp):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (tmp / "out").write_text("done")
    d = cached_stage(Path(root), "shared", "key", build)
    assert (d / "out").read_text() == "done"


def test_two_processes_build_once(tmp_path):
    counter = tmp_path / "builds.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build_worker, args=(str(tmp_path / "cache"), str(counter))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(counter.read_text().splitlines()) == 1
