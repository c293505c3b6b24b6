"""data/executors.py without a cluster: a Ray / Slurm job whose tasks did not all
complete is an error naming the task and its log's last error line (the work dir and
its logs are removed with the unpublished dataset, so the message is all that is left),
and the summed stats read both forms datatrove writes a metric in; the local executor
forks its workers only from a plain process."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from scaletrain.data.executors import (TaskFailed, _check_completed, _summed_stats,
                                       start_method)


def _logs(tmp_path, completed: list[int]):
    logs = tmp_path / "logs-read"
    (logs / "completions").mkdir(parents=True)
    for r in completed:
        (logs / "completions" / f"{r:05d}").touch()
    return logs


def test_all_tasks_completed_passes(tmp_path):
    _check_completed(_logs(tmp_path, [0, 1]), 2, "ray", tmp_path / "none")


def test_missing_task_names_its_last_error_line(tmp_path):
    logs = _logs(tmp_path, [0])
    (logs / "logs").mkdir()
    (logs / "logs" / "task_00001.log").write_text(
        "INFO start\nValueError: bad record in part1.jsonl\nINFO stop\n")
    with pytest.raises(TaskFailed, match=r"1 of 2 tasks of 'logs-read'.*task 1: "
                                         r"ValueError: bad record in part1.jsonl"):
        _check_completed(logs, 2, "ray", logs / "logs")


def test_slurm_task_that_never_started_names_its_array_log(tmp_path):
    logs = _logs(tmp_path, [])
    slurm_logs = tmp_path / "slurm_logs"
    slurm_logs.mkdir()
    (slurm_logs / "7_0.out").write_text("srun: error: Unable to create step\n")
    with pytest.raises(TaskFailed, match="task 0: srun: error: Unable to create step"):
        _check_completed(logs, 1, "slurm", slurm_logs)


def test_summed_stats_reads_plain_and_full_metrics(tmp_path):
    logs = tmp_path / "logs"
    (logs / "stats").mkdir(parents=True)
    for rank, (n, tokens) in enumerate([(3, 10), (4, 20)]):
        steps = [{"name": "read", "time_stats": {}, "stats": {"records": n}},
                 {"name": "tok", "time_stats": {},
                  "stats": {"tokens/train/src0": {"total": tokens, "n": 2, "mean": tokens / 2,
                                                  "unit": "doc"}}}]
        (logs / "stats" / f"{rank:05d}.json").write_text(json.dumps(steps))
    assert dict(_summed_stats(logs, 2)) == {"records": 7, "tokens/train/src0": 30}


def test_start_method_forks_only_a_plain_process(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # pytest's process has it
    # Threads left by earlier tests in this worker (tokenizers, datatrove) would make the
    # process look threaded: count only the threads started from here on.
    count, before = threading.active_count, threading.active_count()
    monkeypatch.setattr(threading, "active_count", lambda: count() - before + 1)
    assert start_method() == "fork"
    monkeypatch.setitem(sys.modules, "torch", object())  # `prepare` called by `train`
    assert start_method() == "forkserver"
    monkeypatch.delitem(sys.modules, "torch")
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert start_method() == "forkserver"  # a thread could hold a lock across fork
    finally:
        stop.set()
        thread.join()
    monkeypatch.setattr(sys, "platform", "darwin")  # fork is unsafe on macOS
    assert start_method() == "forkserver"
