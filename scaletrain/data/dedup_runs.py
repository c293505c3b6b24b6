"""Exact dedup in bounded memory: which documents of a stream repeat an earlier one,
found with sorted runs on disk instead of a set of every digest seen.

A set of digests costs ~110 bytes a unique document (the bytes object, its set slot),
so it grows with the corpus: 27 MB at 2 GB of source files, GBs at a TB. Here the
(digest, position) pairs are written as sorted runs of `run_records` records, merged
(`fan_in` runs at a time, in as many rounds as it takes), and every position but the
first of each digest is a duplicate; those positions, in digest order, are sorted the
same way back into stream order. Memory holds one run and `fan_in` read buffers,
whatever the corpus size (the way datatrove's own exact dedup works: signatures,
sorted, merged). The result is the set's: the first copy of each text is kept.

Hand-written: datatrove's exact-dedup stages key documents by their task and position
in it, which would tie "first copy" to how files were dealt to the workers.
"""

from __future__ import annotations

import heapq
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

DIGEST_BYTES = 32  # sha256
POS_BYTES = 8      # a document's position in the stream, big-endian: sorts as bytes

RUN_RECORDS = 1 << 16
"""Records sorted in memory at once: ~80 bytes each as Python bytes in a list, ~5 MB."""

FAN_IN = 64
"""Runs merged at once; each has a read buffer of `READ_RECORDS` records."""

READ_RECORDS = 1024


def duplicate_positions(digests: Iterable[bytes], folder: Path,
                        run_records: int = RUN_RECORDS,
                        fan_in: int = FAN_IN) -> Iterator[int]:
    """The positions (ascending, 0-based) of the items of `digests` equal to an
    earlier one. The run files live in `folder` (created, removed when done); the
    first `next()` consumes `digests` whole."""
    shutil.rmtree(folder, ignore_errors=True)  # what a killed task left
    folder.mkdir(parents=True)
    size = DIGEST_BYTES + POS_BYTES
    keyed = (d + pos.to_bytes(POS_BYTES, "big") for pos, d in enumerate(digests))
    dups = (int.from_bytes(r[DIGEST_BYTES:], "big")
            for r in _repeats(_sorted(keyed, size, folder / "keys", run_records, fan_in)))
    for r in _sorted((p.to_bytes(POS_BYTES, "big") for p in dups), POS_BYTES,
                     folder / "dups", run_records, fan_in):
        yield int.from_bytes(r, "big")
    shutil.rmtree(folder, ignore_errors=True)


def _repeats(records: Iterator[bytes]) -> Iterator[bytes]:
    """The (digest, position) records, sorted, whose digest is the previous one's."""
    prev = None
    for r in records:
        d = r[:DIGEST_BYTES]
        if d == prev:
            yield r
        prev = d


def _sorted(records: Iterable[bytes], size: int, folder: Path, run_records: int,
            fan_in: int) -> Iterator[bytes]:
    """`records` (each `size` bytes) in byte order, through sorted runs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    runs, buf = [], []
    for r in records:
        buf.append(r)
        if len(buf) >= run_records:
            runs.append(_write_run(folder, len(runs), sorted(buf)))
            buf = []
    if buf:
        runs.append(_write_run(folder, len(runs), sorted(buf)))
    del buf
    level = 0
    while len(runs) > fan_in:  # merge rounds: at most `fan_in` files open at once
        level += 1
        runs = [_write_run(folder, f"{level}-{i}", heapq.merge(
                    *(_read_run(p, size) for p in runs[j:j + fan_in])))
                for i, j in enumerate(range(0, len(runs), fan_in))]
    yield from heapq.merge(*(_read_run(p, size) for p in runs))


def _write_run(folder: Path, name, records: Iterable[bytes]) -> Path:
    path = folder / f"run-{name}.bin"
    with open(path, "wb") as f:
        for r in records:
            f.write(r)
    return path


def _read_run(path: Path, size: int) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while block := f.read(size * READ_RECORDS):
            for i in range(0, len(block), size):
                yield block[i:i + size]
    path.unlink()  # merged: no longer needed
