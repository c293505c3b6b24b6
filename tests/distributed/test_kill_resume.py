"""A killed rank, end to end: two trainer processes (started like torchrun's workers but
without its agent, which would kill the survivor itself), rank 1 is SIGKILLed after a
checkpoint; rank 0 must stop within parallel.timeout_s with one clear line, and the run
must resume from that checkpoint (here on one process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from spawn import free_port

from scaletrain.checkpoint.manager import list_checkpoints
from test_cli import ROOT, TINY, prepared  # noqa: F401 - module fixture

ARGS = [*TINY, "--train.steps=100000", "--checkpoint.interval=3", "--eval.interval=0",
        "--eval.test=false", "--schedule.name=constant", "--parallel.timeout_s=5"]


def test_killed_rank_stops_the_survivor_and_the_run_resumes(prepared, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = [*ARGS, f"--data.prepared_dir={prepared}", f"--run.dir={run}"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "scaletrain", "train", *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        ckpt = run / "checkpoints" / "step-00000003"
        deadline = time.monotonic() + 150
        while not ckpt.is_dir() and time.monotonic() < deadline:
            assert procs[0].poll() is None, procs[0].stderr.read()[-2000:]
            time.sleep(0.2)
        assert ckpt.is_dir(), "no checkpoint within 150 s"
        procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - t_kill
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1, err[-2000:]
    assert "scaletrain: rank 0: a collective failed" in err and "Traceback" not in err
    assert waited < 5 + 30  # the timeout plus slack for this shared, loaded machine
    # Completed checkpoints only: the kill can leave a half-written `step-….tmp`, which
    # the manager ignores (and removes on its next save).
    last = list_checkpoints(run / "checkpoints")[-1][0]
    # Resume the same run directory on one process and take two more steps.
    proc = subprocess.run([sys.executable, "-m", "scaletrain", "train", *args,
                           "--parallel.dp_shard=1", f"--train.steps={last + 2}",
                           "--run.overwrite=false"],
                          env={k: v for k, v in env.items() if k != "WORLD_SIZE"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from step-{last:08d}" in proc.stderr
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == list(range(1, last + 3))  # no step lost or repeated in the log
