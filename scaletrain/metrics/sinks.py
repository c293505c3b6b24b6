"""Metric sinks: where logged records go (DESIGN.md §1.8, §3).

A record is a flat dict with at least ``"kind"`` (``"train"``, ``"eval"``, ...) and
``"step"`` (optimizer steps, counted from 1); eval records also carry ``"split"``.
The trainer builds records once and hands them to a :class:`MultiSink`; each sink decides
what to do with them, so adding an output never touches the training loop.

Sinks are not rank-aware: the caller creates them on rank 0 only.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from scaletrain.metrics.jsonutil import to_jsonable

# Fields that identify a record rather than measure something; never plotted as scalars.
_ID_FIELDS = ("kind", "step", "split")


@runtime_checkable
class MetricSink(Protocol):
    """Anything that accepts metric records."""

    def write(self, record: dict) -> None:
        """Consume one record (a dict with at least "kind" and "step")."""

    def close(self) -> None:
        """Flush and release resources; no `write` may follow."""


def _check_record(record: dict) -> None:
    # Fail at the faulty call site rather than produce a file no reader understands.
    if "kind" not in record or "step" not in record:
        raise ValueError(f"metric record needs 'kind' and 'step', got keys {list(record)}")


def _drop_partial_last_line(path: Path) -> None:
    """Cut a final line that has no newline (a run killed mid-write).

    Appending after it would glue the next record onto the fragment and corrupt both;
    the fragment itself is unreadable anyway.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        end = f.seek(0, io.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos, block = end, 1 << 16
        while pos > 0:  # scan backwards block by block for the last newline
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)


class JsonlSink:
    """Append each record to a JSON Lines file (``metrics.jsonl``), one object per line.

    * Floats are written with full precision (``repr``, via ``json``): reading the file
      back gives bit-identical values.
    * NaN and infinities are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``
      so the file stays valid JSON; :func:`scaletrain.metrics.read_metrics` turns them
      back into floats.
    * Each line is flushed to the OS as it is written, so a killed process keeps every
      completed line (no fsync: surviving a power cut is not worth a disk sync per step).
    * Opening an existing file appends (resume); a partial last line left by a killed
      run is removed first.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._f = open(self.path, "a", encoding="utf-8", newline="\n")

    def write(self, record: dict) -> None:
        _check_record(record)
        # allow_nan=False: to_jsonable has already replaced non-finite floats, so a
        # NaN reaching json here would be a bug we want to hear about.
        line = json.dumps(to_jsonable(record), allow_nan=False, ensure_ascii=False)
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _scalar(value: Any) -> float | None:
    """`value` as a float if it is a real number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalar, one-element tensor
    if callable(item):
        try:
            return _scalar(item())
        except (ValueError, RuntimeError):
            return None
    return None


def tag_prefix(record: dict) -> str:
    """The tag group of a record: ``kind``, or ``eval_<split>`` for eval records."""
    kind = record["kind"]
    if kind == "eval" and "split" in record:
        return f"eval_{record['split']}"
    return str(kind)


def scalar_fields(record: dict) -> dict[str, float]:
    """Every number of a record by tag: ``"{prefix}/{key}"`` (see `tag_prefix`), and
    ``"{prefix}/{key}/{part}"`` for a per-part field ({"<MoE block>": ...}). The charts'
    names in every tracker (TensorBoard, MLflow, W&B) are these."""
    _check_record(record)
    prefix, out = tag_prefix(record), {}
    for key, value in record.items():
        if key in _ID_FIELDS:
            continue
        x = _scalar(value)
        if x is not None:
            out[f"{prefix}/{key}"] = x
        elif isinstance(value, dict):
            for part, v in value.items():
                if (y := _scalar(v)) is not None:
                    out[f"{prefix}/{key}/{part}"] = y
    return out


class TensorBoardSink:
    """Write every numeric field of a record as a TensorBoard scalar at ``record["step"]``.

    Tags are ``"{kind}/{key}"`` (e.g. ``train/loss``), and ``"eval_{split}/{key}"`` for
    eval records (e.g. ``eval_val/loss``), so each split gets its own chart group.
    Uses ``torch.utils.tensorboard.SummaryWriter`` (imported here, not at package import,
    because it pulls in the tensorboard package, which most code paths never need).
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        # flush_secs: the default 120 s would lose two minutes of curves on a crash.
        self._writer = SummaryWriter(log_dir=str(logdir), flush_secs=flush_secs)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for tag, x in scalar_fields(record).items():
            self._writer.add_scalar(tag, x, global_step=step)
        prefix = tag_prefix(record)
        for key, value in record.items():
            if key not in _ID_FIELDS and isinstance(value, dict):
                self._write_histograms(f"{prefix}/{key}", value, step)

    def _write_histograms(self, tag: str, parts: dict, step: int) -> None:
        """A list of numbers per part as a histogram (the MoE tokens per expert of each
        block: `moe_load`)."""
        for name, v in parts.items():
            if isinstance(v, list) and v and all(_scalar(e) is not None for e in v):
                # the histogram of expert ids over the assignments: bucket i (upper
                # limit i + 0.5) holds expert i's count, written raw (no samples)
                n = [float(e) for e in v]
                self._writer.add_histogram_raw(
                    f"{tag}/{name}", min=0, max=len(n) - 1, num=sum(n),
                    sum=sum(i * c for i, c in enumerate(n)),
                    sum_squares=sum(i * i * c for i, c in enumerate(n)),
                    bucket_limits=[i + 0.5 for i in range(len(n))], bucket_counts=n,
                    global_step=step)

    def flush(self) -> None:
        """Push pending events to disk now."""
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def format_record(record: dict) -> str:
    """One human line, e.g. ``step 200 | eval val | loss 3.2145 | ppl 24.88``."""
    head = f"step {record['step']} | {record['kind']}"
    if "split" in record:
        head += f" {record['split']}"
    parts = [head]
    for key, value in record.items():
        if key in _ID_FIELDS:
            continue
        x = _scalar(value)
        parts.append(f"{key} {x:.5g}" if x is not None else f"{key} {value}")
    return " | ".join(parts)


class ConsoleSink:
    """Print records of the chosen kinds (default: eval only) as one line each.

    Train records are shown by the progress bar instead; printing them too would flood
    the terminal. Pass ``print_fn=progress.write`` so lines do not break a live bar.
    """

    def __init__(self, kinds: Iterable[str] = ("eval",),
                 print_fn: Callable[[str], None] | None = None):
        self.kinds = frozenset(kinds)
        self._print = print_fn or (lambda s: print(s, file=sys.stdout, flush=True))

    def write(self, record: dict) -> None:
        _check_record(record)
        if record["kind"] in self.kinds:
            self._print(format_record(record))

    def close(self) -> None:
        pass


class MultiSink:
    """Fan one record out to several sinks, in order."""

    def __init__(self, sinks: Iterable[MetricSink]):
        self.sinks = list(sinks)

    def write(self, record: dict) -> None:
        _check_record(record)
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        # Close every sink even if one fails, so the JSONL file is never left open
        # because TensorBoard raised; re-raise the first error afterwards.
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
        if first is not None:
            raise first

    def __enter__(self) -> "MultiSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
