"""Metrics: meters (tokens/s, MFU, memory), sinks (JSONL, TensorBoard, console),
a progress bar, run plots and the run summary (DESIGN.md §3, §4).

Importing this package is cheap: tensorboard and matplotlib are imported only when a
TensorBoard sink is built or a plot is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from scaletrain.metrics.meters import (
    Throughput,
    current_rss_mb,
    default_cache_path,
    gpt_flops_per_token,
    measure_peak_flops,
    peak_memory_mb,
)
from scaletrain.metrics.plots import plot_run
from scaletrain.metrics.progress import Progress
from scaletrain.metrics.sinks import (
    ConsoleSink,
    JsonlSink,
    MetricSink,
    MultiSink,
    TensorBoardSink,
    format_record,
)
from scaletrain.metrics.summary import read_metrics, write_json_atomic, write_summary

__all__ = [
    "ConsoleSink", "JsonlSink", "MetricSink", "MultiSink", "Progress", "TensorBoardSink",
    "Throughput", "build_sinks", "current_rss_mb", "default_cache_path", "format_record",
    "gpt_flops_per_token", "measure_peak_flops", "peak_memory_mb", "plot_run",
    "read_metrics", "write_json_atomic", "write_summary",
]


def build_sinks(run_dir: str | os.PathLike, *, console: bool, tensorboard: bool,
                print_fn: Callable[[str], None] | None = None,
                trackers: Iterable[MetricSink] = ()) -> MultiSink:
    """The standard sinks of a run: always ``run_dir/metrics.jsonl``; plus eval lines
    on the console and ``run_dir/tensorboard/`` event files when asked, and the
    experiment trackers (metrics/trackers.py `tracker_sinks`).

    Call on rank 0 only. Pass ``print_fn=progress.write`` so console lines do not break
    the progress bar.
    """
    run_dir = Path(run_dir)
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if console:
        sinks.append(ConsoleSink(print_fn=print_fn))
    return MultiSink([*sinks, *trackers])
