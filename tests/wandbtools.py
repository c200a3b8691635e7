"""Read the records of an offline W&B run (`run-<id>.wandb`), as `wandb sync` would send them.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", a 2-byte magic and a version byte), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle,
4 last); a record is one protobuf `wandb.proto.wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, out, parts = HEADER, [], []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        parts.append(chunk)
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            out.append(rec)
            parts = []
    return out


def run_file(run_dir: Path) -> Path:
    return next(Path(run_dir).glob("run-*.wandb"))


def summary(recs: list[pb.Record]) -> dict:
    """The final summary: the last value of each key among the summary records."""
    out = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    return out


def history(recs: list[pb.Record]) -> list[dict]:
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def metrics(recs: list[pb.Record]) -> list[pb.MetricRecord]:
    return [r.metric for r in recs if r.WhichOneof("record_type") == "metric"]


def run_record(recs: list[pb.Record]) -> pb.RunRecord:
    return next(r.run for r in recs if r.WhichOneof("record_type") == "run")
