"""The records of one source file, streamed: the raw text of each, or why it has none.

A text file is one record (its decoded bytes); a JSONL file one per non-blank line; a
Parquet or Arrow table one per row, read a record batch at a time, so that memory holds
one batch, never the file. A record is malformed when its line is not JSON (or not a
JSON object) or its `text_key` field is missing or not a string; it is reported, not
fatal, unless every record of a source is (see `pipeline.py`).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from scaletrain.data.clean import Skip, decode_text
from scaletrain.data.sources import ARROW, JSONL, PARQUET, TEXT
from scaletrain.errors import DataError

BATCH_ROWS = 1024
"""Rows per record batch read from a Parquet file: large enough to amortise the reads,
small enough that a batch of long documents stays a few MB."""


def iter_records(path: Path, fmt: str, text_key: str) -> Iterator[str | Skip]:
    """Each record of `path` in file order: its raw text, or the Skip saying why not."""
    if fmt == TEXT:
        yield decode_text(path.read_bytes())
    elif fmt == JSONL:
        with _open_lines(path) as f:
            for line in f:
                if line.strip():
                    yield _json_text(line, text_key)
    else:
        for column in _table_columns(path, fmt, text_key):
            for value in column:
                yield value if isinstance(value, str) else Skip.MALFORMED


def _json_text(line: bytes, text_key: str) -> str | Skip:
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return Skip.MALFORMED
    text = rec.get(text_key) if isinstance(rec, dict) else None
    return text if isinstance(text, str) else Skip.MALFORMED


def _open_lines(path: Path) -> io.BufferedIOBase:
    """`path` opened for reading bytes, decompressed by its suffix (.gz, .zst)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard  # only .jsonl.zst sources need it

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw,
                                                                            closefd=True))
    return open(path, "rb")


def _table_columns(path: Path, fmt: str, text_key: str) -> Iterator[list]:
    """The `text_key` column of a Parquet / Arrow file, one record batch at a time."""
    import pyarrow as pa  # heavy; only table sources need it
    import pyarrow.parquet as pq

    if fmt == PARQUET:
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=[text_key]):
                yield batch.column(0).to_pylist()
    elif fmt == ARROW:
        with pa.memory_map(str(path)) as src:
            for batch in _arrow_reader(pa, src)[1]:
                yield batch.column(text_key).to_pylist()
    else:
        raise ValueError(f"not a table format: {fmt}")


def _arrow_reader(pa, src):
    """(schema, record batches) of an Arrow stream (what save_to_disk writes) or an Arrow
    file, by trying the first."""
    try:
        r = pa.ipc.open_stream(src)
        return r.schema, r
    except pa.ArrowInvalid:
        src.seek(0)
        f = pa.ipc.open_file(src)
        return f.schema, (f.get_batch(i) for i in range(f.num_record_batches))


def table_columns(path: Path, fmt: str) -> list[str]:
    """Column names of a Parquet / Arrow file, from its schema alone (no rows read)."""
    import pyarrow as pa  # heavy; only table sources need it
    import pyarrow.parquet as pq

    try:
        if fmt == PARQUET:
            return pq.read_schema(path).names
        with pa.memory_map(str(path)) as src:
            return _arrow_reader(pa, src)[0].names
    except (pa.ArrowException, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable {fmt} file ({first})") from None


def check_text_column(files: list[tuple[Path, str]], text_key: str) -> None:
    """DataError naming the first table file (Parquet / Arrow) without a `text_key` column;
    checked from the schemas before anything is read or written."""
    for path, fmt in files:
        if fmt in (PARQUET, ARROW):
            names = table_columns(path, fmt)
            if text_key not in names:
                raise DataError(f"{path}: no column '{text_key}' (data.text_key); its "
                                f"columns are {', '.join(names) or 'none'}")
