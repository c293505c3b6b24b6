"""Parameter-server mode honours what it shares with the spmd trainer (issue 14 item 7):
the fault guard (faults.skip_nonfinite, faults.spike_*) on every update, the rollback
after faults.max_consecutive bad updates (faults.rollback_lr_factor), keep-best of the
run recorder with checkpoint.keep_best, and checkpoint.on_signal.

Workers' gradients are tampered with through `worker_hook` (one server, one worker:
the cheapest layout; the update of clock c is step c + 1).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from test_paramserver import records, run_ps
from tests.conftest import REPO, run_cli


def _poison(worker) -> None:
    """Step 3: NaN gradients and loss; step 6: the loss x 1000 (a spike), gradients
    as computed."""
    gradient, calls = worker.gradient, [0]

    def tampered():
        calls[0] += 1
        grads, loss, count = gradient()
        if calls[0] == 3:
            grads = [[g * math.nan for g in shard] for shard in grads]
            loss = math.nan
        elif calls[0] == 6:
            loss *= 1000.0
        return grads, loss, count

    worker.gradient = tampered


def test_bad_updates_are_skipped_and_logged(tiny_args, tmp_path):
    args = tiny_args + ["--train.steps=8", "--eval.test=false", "--eval.interval=0",
                        "--faults.spike_min_history=2", "--faults.spike_window=4"]
    summary = run_ps(args, 1, 1, hook=_poison)
    faults = [(r["step"], r["event"]) for r in records(tmp_path / "run", "fault")]
    assert faults == [(3, "nonfinite_loss"), (6, "loss_spike")]
    assert summary["steps"] == 8
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(bool(w.isfinite().all()) for w in weights.values())  # the NaN never landed


def _nan_at_5_and_6_recording_pulls(worker) -> None:
    """Steps 5 and 6: NaN gradients and loss. Every step: the fp64 sum of the parameters
    it computes on, appended to pulled.json beside the run directory."""
    gradient, sums = worker.gradient, []
    out = Path(worker.cfg.run.dir).parent / "pulled.json"

    def tampered():
        sums.append(sum(float(p.detach().double().sum()) for p in worker.model.parameters()))
        out.write_text(json.dumps(sums))
        grads, loss, count = gradient()
        if len(sums) in (5, 6):
            grads = [[g * math.nan for g in shard] for shard in grads]
            loss = math.nan
        return grads, loss, count

    worker.gradient = tampered


def test_max_consecutive_bad_updates_roll_back(tiny_args, tmp_path):
    """faults.max_consecutive=2: the 2nd bad update in a row (step 6) rolls the servers
    back to the newest checkpoint (step 3; step 4 was good, so its parameters differ)
    and halves the LR; step 7 computes on exactly the parameters of step 3's checkpoint."""
    args = tiny_args + ["--train.steps=8", "--eval.test=false", "--eval.interval=0",
                        "--checkpoint.interval=3", "--faults.max_consecutive=2",
                        "--faults.rollback_lr_factor=0.5", "--schedule.name=constant",
                        "--schedule.warmup_steps=0", "--train.log_interval=1"]
    summary = run_ps(args, 2, 1, hook=_nan_at_5_and_6_recording_pulls)
    run = tmp_path / "run"
    faults = [(r["step"], r["event"]) for r in records(run, "fault")]
    assert faults == [(5, "nonfinite_loss"), (6, "nonfinite_loss"), (6, "rollback")]
    rollback = records(run, "fault")[-1]
    assert rollback["to_step"] == 3 and rollback["lr_factor"] == 0.5
    pulled = json.loads((tmp_path / "pulled.json").read_text())  # [i]: before step i + 1
    assert pulled[3] != pulled[4] == pulled[5]  # 5, 6 skipped
    assert pulled[6] == pulled[3]  # step 7 starts from the checkpoint of step 3
    lr = {r["step"]: r["lr"] for r in records(run, "train")}
    assert lr[7] == lr[8] == 0.5 * lr[4]
    assert summary["steps"] == 8


def _ascend_after_two_steps(worker) -> None:
    """From step 3 on, gradient *ascent* (x -100: Adam's momentum turns at once), so the
    validation loss is best at step 2."""
    gradient, calls = worker.gradient, [0]

    def ascent():
        calls[0] += 1
        grads, loss, count = gradient()
        if calls[0] > 2:
            grads = [[g * -100.0 for g in shard] for shard in grads]
        return grads, loss, count

    worker.gradient = ascent


def test_keep_best_keeps_the_best_checkpoint(tiny_args, tmp_path):
    args = tiny_args + ["--train.steps=6", "--eval.test=false", "--eval.interval=2",
                        "--checkpoint.interval=2", "--checkpoint.keep=1",
                        "--checkpoint.keep_best=true", "--optim.lr=1e-2",
                        "--schedule.warmup_steps=0"]
    summary = run_ps(args, 1, 1, hook=_ascend_after_two_steps)
    assert summary["best_step"] == 2, summary
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000006"]
    assert summary["best_val_loss"] == min(r["loss"] for r in records(tmp_path / "run",
                                                                      "eval"))


def test_sigterm_saves_a_checkpoint_and_exits_128_plus_n(tiny_args, tmp_path):
    """checkpoint.on_signal through the CLI (`--nproc 2`: one server, one worker): a
    scheduler's SIGTERM to the launcher ends the run after the update being applied,
    with that step's checkpoint, exit 143 and the spmd trainer's line; the same
    command then resumes from it."""
    run = tmp_path / "run"
    ps = ["--parallel.mode=ps", "--parallel.ps_servers=1", "--train.log_interval=1",
          "--eval.interval=0", "--eval.test=false", "--checkpoint.interval=0",
          "--train.progress=off"]
    cmd = [sys.executable, "-m", "scaletrain", "train", *tiny_args, *ps, "--nproc", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--train.steps=100000"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and records(run, "train")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-2000:]
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp"), ckpts
    step = int(ckpts[0].name.split("-")[1])
    assert f"after step {step}; checkpoint {ckpts[0].name} saved" in err
    # Resume in place: train to two steps past the checkpoint.
    done = run_cli("train", *tiny_args, *ps, f"--train.steps={step + 2}", "--nproc", "2",
                   timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 2
