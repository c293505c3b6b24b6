"""A rank that dies or hangs must not hang the others: the survivor stops with one clear
line within `parallel.timeout_s` (here 4 s) instead of waiting forever."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spawn import free_port

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def run_pair(mode: str, limit: float = 90.0):
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(HERE / "harness.py"), mode],
                              env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        out0, err0 = procs[0].communicate(timeout=limit)
        t_exit = time.monotonic()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return procs[0].returncode, err0, t_exit


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_survivor_exits_with_a_clear_message(mode):
    code, err, t_exit = run_pair(mode)
    assert code == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if "a collective failed" in ln]
    assert lines and lines[0].startswith("scaletrain: rank 0:"), err[-2000:]
    assert "parallel.timeout_s=4" in lines[0]
    assert "Traceback" not in err
