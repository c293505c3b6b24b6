"""Driving a real `scaletrain` process from a test: start it in the background, wait for
a file it writes, and SIGKILL it at a chosen training step (the exact-resume tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO


def popen(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m scaletrain ARGS` in the background, stdout and stderr into `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "scaletrain", *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared"
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.01)


def last_train_step(run: Path) -> int:
    """The newest train step the run has logged (0 before any); only whole lines: a poll
    may catch the writer mid-line."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    steps = [r["step"] for r in map(json.loads, text[: text.rfind("\n") + 1].splitlines())
             if r["kind"] == "train"]
    return max(steps, default=0)


def sigkill_at_step(proc: subprocess.Popen, run: Path, first_checkpoint: Path, target: int,
                    delay: float, seed: int, timeout: float = 120) -> None:
    """SIGKILL the training `proc` `delay` seconds after train step `target` is logged
    (after `first_checkpoint` appeared); killed in any case on the way out. `seed`: the
    KILL_SEED the moment was drawn with, named in every failure."""
    try:
        wait_for(first_checkpoint, proc, timeout)
        while last_train_step(run) < target:
            assert proc.poll() is None, f"run ended before step {target} (KILL_SEED={seed})"
            time.sleep(0.002)
        time.sleep(delay)
        assert proc.poll() is None, f"run finished before the kill (KILL_SEED={seed})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
