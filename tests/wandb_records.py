"""Read back a W&B offline run file (`<run.dir>/wandb/offline-run-*/run-<id>.wandb`),
for tests: wandb 0.31 has no public reader of its offline files (the Python datastore
it once had is gone; wandb-core writes them), so this decodes the format by hand: a
LevelDB-style log — a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
blocks of records, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
3 middle, 4 last) — whose payloads are `wandb_internal_pb2.Record` protobufs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK, _HEADER = 32768, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb  # optional dependency of the tests

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(run_dir: Path) -> dict:
    """{"ids": run ids of every offline run dir, "history": [rows as dicts], "config":
    {key: value}, "files": [saved paths]} of all offline runs under run_dir/wandb."""
    out = {"ids": [], "history": [], "config": {}, "files": []}
    for f in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for r in records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(r.run.run_id)
                out["config"].update({u.key: json.loads(u.value_json)
                                      for u in r.run.config.update})
            elif kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in r.history.item})
            elif kind == "files":
                out["files"] += [f.path for f in r.files.files]
    return out
