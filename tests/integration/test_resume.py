"""Exact resume through the real CLI: SIGKILL at a random moment, SIGTERM, bad checkpoints.

The kill test runs the same tiny run twice: once uninterrupted, once SIGKILLed at a
random moment after its first checkpoint and then resumed with the same command. Every
logged loss (and lr, grad norm, token count, eval loss) must be bitwise equal, and the
final weights `torch.equal`. It uses dropout (the RNG streams must be restored),
`data.loader_workers=2` (prefetch must not leak into the position) and bf16 autocast.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import one_error_line, run_cli
from tests.helpers.runs import popen, sigkill_at_step, wait_for

pytestmark = pytest.mark.timeout(180)

KILL_ARGS = ["--model.dropout=0.1", "--data.loader_workers=2", "--precision.dtype=bf16",
             "--train.steps=60", "--checkpoint.interval=10", "--eval.interval=25",
             "--eval.test=false", "--train.threads=1", "--optim.lr=3e-3"]


def records(run: Path, kinds=("train", "eval", "fault")) -> list[tuple]:
    out = []
    text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    # Only whole lines: a poll may catch the writer mid-line.
    for line in text[: text.rfind("\n") + 1].splitlines():
        r = json.loads(line)
        if r["kind"] in kinds:
            out.append((r["kind"], r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"),
                        r.get("tokens")))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigkill_at_a_random_moment_then_resume_is_bitwise_identical(tiny_args, tmp_path):
    base = [a for a in tiny_args if not a.startswith("--run.dir")] + KILL_ARGS
    ref, run = tmp_path / "ref", tmp_path / "killed"
    done = run_cli("train", *base, f"--run.dir={ref}")
    assert done.returncode == 0, done.stderr[-3000:]

    # The kill moment is drawn as a step (and a fraction of a step), not a wall-clock
    # delay: a fast machine ran all 60 steps inside a fixed 0.8 s window.
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    target, delay = rng.randint(11, 45), rng.uniform(0.0, 0.03)
    proc = popen(["train", *base, f"--run.dir={run}"], tmp_path / "killed.log")
    sigkill_at_step(proc, run, run / "checkpoints" / "step-00000010", target, delay, seed)
    killed_at = max(r[1] for r in records(run, ("train",)))
    assert killed_at < 60, f"KILL_SEED={seed}"

    resumed = run_cli("train", *base, f"--run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-" in resumed.stderr
    got, want = records(run), records(ref)
    assert [r[:2] for r in got] == [r[:2] for r in want], f"KILL_SEED={seed}"  # no dupes
    assert got == want, f"KILL_SEED={seed} killed after step {killed_at}"
    assert_same_weights(ref / "model.safetensors", run / "model.safetensors")


def test_sigterm_saves_exits_and_resumes(tiny_args, tmp_path):
    run = tmp_path / "r"
    args = ["train", *[a for a in tiny_args if not a.startswith("--run.dir")],
            "--train.steps=400", "--checkpoint.interval=1000", "--eval.test=false",
            "--train.threads=1", f"--run.dir={run}"]
    proc = popen(args, tmp_path / "log")
    try:
        wait_for(run / "metrics.jsonl", proc)
        while not records(run, ("train",)):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    assert "stopped by SIGTERM" in log and "Traceback" not in log
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp")
    stopped = int(ckpts[0].name.split("-")[1])
    assert 1 <= stopped < 400
    assert max(r[1] for r in records(run, ("train",))) == stopped


@pytest.fixture(scope="module")
def two_checkpoints(prepared_dir, tmp_path_factory):
    """A finished 10-step run with checkpoints at steps 5 and 10 (copied per test)."""
    from tests.conftest import TINY_DATA, TINY_GPT

    run = tmp_path_factory.mktemp("ckpt") / "run"
    args = [*TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}", "--train.steps=10",
            "--checkpoint.interval=5", "--eval.test=false", "--train.threads=1"]
    proc = run_cli("train", *args, f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, args


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def damage(ckpt: Path, how: str) -> None:
    data = ckpt / "__0_0.distcp"
    if how == "corrupt":
        b = bytearray(data.read_bytes())
        b[len(b) // 2] ^= 0xFF
        data.write_bytes(bytes(b))
    elif how == "truncated":
        data.write_bytes(data.read_bytes()[:-100])
    elif how == "missing":
        (ckpt / ".metadata").unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how, fragment", [("corrupt", "corrupt"),
                                           ("truncated", "truncated"),
                                           ("missing", "missing")])
def test_bad_only_checkpoint_exits_2(two_checkpoints, tmp_path, how, fragment):
    src, args = two_checkpoints
    run = copy_run(src, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-00000005")
    damage(run / "checkpoints" / "step-00000010", how)
    proc = run_cli("train", *args, f"--run.dir={run}", "--train.steps=12")
    one_error_line(proc, "no valid checkpoint", fragment)


def test_bad_newest_checkpoint_falls_back_to_the_previous(two_checkpoints, tmp_path):
    src, args = two_checkpoints
    run = copy_run(src, tmp_path / "run")
    damage(run / "checkpoints" / "step-00000010", "corrupt")
    # A harmless change (more steps) is allowed on resume.
    proc = run_cli("train", *args, f"--run.dir={run}", "--train.steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping invalid checkpoint" in proc.stderr and "corrupt" in proc.stderr
    assert "resumed from step-00000005" in proc.stderr
    steps = [r[1] for r in records(run, ("train",))]
    assert steps == list(range(1, 13))  # 6..10 re-run once, no duplicates


def test_foreign_directory_exits_2(two_checkpoints, tmp_path):
    _, args = two_checkpoints
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 64)
    proc = run_cli("train", *args, f"--run.dir={tmp_path / 'new'}",
                   f"--checkpoint.resume={foreign}")
    one_error_line(proc, str(foreign), "not a scaletrain checkpoint")


def test_incompatible_config_is_refused_with_the_differences(two_checkpoints, tmp_path):
    src, args = two_checkpoints
    run = copy_run(src, tmp_path / "run")
    proc = run_cli("train", *args, f"--run.dir={run}", "--model.d_model=64",
                   "--model.n_layer=3", "--train.steps=12")
    one_error_line(proc, "model.d_model: 32 -> 64", "model.n_layer: 2 -> 3")


def test_rerunning_a_finished_run_logs_nothing_twice(two_checkpoints, tmp_path):
    src, args = two_checkpoints
    run = copy_run(src, tmp_path / "run")
    before = records(run)
    proc = run_cli("train", *args, f"--run.dir={run}")  # resumes at step 10 = the end
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000010" in proc.stderr
    assert records(run) == before  # the final evals were cut and logged again, once


def train_lrs(run: Path) -> dict[int, float]:
    return {r[1]: r[3] for r in records(run, ("train",))}


def cosine_lr(t: int, lr: float, min_lr: float, steps: int) -> float:
    """The default schedule (cosine, no warmup) at 0-based step t, by its definition."""
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / steps)))


def test_resume_with_new_lr_trains_at_the_new_schedule(two_checkpoints, tmp_path):
    """Issue 13 item 3: the LR after a resume with new optim/schedule flags is the new
    config's schedule at every step (not the old peak under the new schedule)."""
    src, args = two_checkpoints
    run = copy_run(src, tmp_path / "run")
    proc = run_cli("train", *args, f"--run.dir={run}", "--train.steps=16",
                   "--optim.lr=1e-4", "--schedule.min_lr=1e-5", "--optim.weight_decay=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000010" in proc.stderr
    changed = [ln for ln in proc.stderr.splitlines() if "changed settings" in ln]
    assert len(changed) == 1, proc.stderr
    for fragment in ("optim.lr: 0.001 -> 0.0001", "schedule.min_lr: 0.0 -> 1e-05",
                     "train.steps: 10 -> 16", "optim.weight_decay: 0.1 -> 0.05"):
        assert fragment in changed[0], changed[0]
    lrs = train_lrs(run)
    assert sorted(lrs) == list(range(1, 17))
    for step in range(11, 17):
        assert lrs[step] == pytest.approx(cosine_lr(step - 1, 1e-4, 1e-5, 16), rel=1e-12, abs=0), step
    saved = (run / "config.toml").read_text()
    assert "lr = 0.0001" in saved and "min_lr = 1e-05" in saved


def test_resume_with_more_steps_follows_the_longer_schedule(two_checkpoints, tmp_path):
    """An allowed change (train.steps, eval interval) still resumes; the LR from the
    resumed step on is the longer run's cosine, the first resumed step included (it was
    the old schedule's last value, 0.0)."""
    src, args = two_checkpoints
    run = copy_run(src, tmp_path / "run")
    proc = run_cli("train", *args, f"--run.dir={run}", "--train.steps=14",
                   "--eval.interval=7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = train_lrs(run)
    assert sorted(lrs) == list(range(1, 15))
    for step in range(11, 15):
        assert lrs[step] == pytest.approx(cosine_lr(step - 1, 1e-3, 0.0, 14), rel=1e-12, abs=0)
    assert [r[1] for r in records(run, ("eval",)) if r[1] > 10] == [14]


def test_bare_resume_takes_the_runs_own_config(two_checkpoints, tmp_path):
    """Issue 13 item 4: `train --run.dir=RUN` alone resumes RUN as configured (its
    model, data and steps), not with the defaults, and leaves config.toml as it was."""
    src, _ = two_checkpoints
    run = copy_run(src, tmp_path / "run")
    def saved_config():  # run.dir names the copy's location: not a training setting
        return [ln for ln in (run / "config.toml").read_text().splitlines()
                if not ln.startswith("dir = ")]

    before = saved_config()
    records_before = records(run)
    proc = run_cli("train", f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000010" in proc.stderr
    assert "changed settings" not in proc.stderr, proc.stderr
    assert saved_config() == before
    assert records(run) == records_before  # the 10-step run was already finished
    # A flag on top of the bare resume is a change of the saved config.
    proc = run_cli("train", f"--run.dir={run}", "--train.steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.steps: 10 -> 12" in proc.stderr
    assert max(train_lrs(run)) == 12
    assert "n_layer = 2" in (run / "config.toml").read_text()
