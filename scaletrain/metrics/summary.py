"""`summary.json` writing and `metrics.jsonl` reading (DESIGN.md §3)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from scaletrain.metrics.jsonutil import from_jsonable, to_jsonable


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON so that readers see the old file or the new one,
    never a half-written one.

    The temporary file is created in the destination directory because ``os.replace``
    is only atomic within one filesystem. Non-finite floats become ``"nan"``/``"inf"``
    strings (see :mod:`scaletrain.metrics.jsonutil`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False, ensure_ascii=False)
    # A unique name opened with O_EXCL, not tempfile.mkstemp: mkstemp creates mode 0600
    # whatever the umask, and summary.json is as readable as every other run file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            # fsync before the rename: otherwise a crash can leave the *new* name
            # pointing at an empty file on some filesystems (ext4 delayed allocation).
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_summary(path: str | os.PathLike, summary: dict) -> Path:
    """Atomically write the run's `summary.json` (final train/val/test metrics, tokens/s,
    MFU, peak memory, wall time). Returns the path written."""
    return write_json_atomic(path, summary)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Parse a `metrics.jsonl` into a list of records, in file order.

    A final line that does not parse is skipped: it is the partial write of a run that
    was killed mid-line. A bad line anywhere else means the file is corrupt and raises
    ``ValueError`` naming the file and line. ``"nan"``/``"inf"``/``"-inf"`` strings are
    turned back into floats. Blank lines are ignored. A missing file raises
    ``FileNotFoundError``.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Index of the last non-blank line: only that one may be truncated.
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        records.append(from_jsonable(rec))
    return records
