"""End to end through the real CLI (what users run): `scaletrain train --nproc 2` on the
built-in corpus gives the single-process run's losses, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain.cli import main

ROOT = Path(__file__).parents[2]
TINY = ["--config", str(ROOT / "configs/tiny.toml"), "--data.max_files=20",
        "--data.vocab_size=300", "--model.n_layer=2", "--model.d_model=32",
        "--model.n_head=2", "--model.seq_len=32", "--train.steps=6", "--train.batch_size=8",
        "--train.micro_batch_size=2", "--train.log_interval=1", "--eval.interval=3",
        "--eval.batches=2", "--eval.batch_size=8", "--eval.test_batches=2",
        "--schedule.warmup_steps=0", "--train.progress=off", "--run.overwrite=true"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    assert main(["prepare", *TINY, f"--data.prepared_dir={d}"]) == 0
    return d


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_nproc_2_fsdp_matches_one_process(prepared, tmp_path):
    common = [*TINY, f"--data.prepared_dir={prepared}"]
    assert main(["train", *common, f"--run.dir={tmp_path / 'one'}"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "scaletrain", "train", *common,
                           f"--run.dir={tmp_path / 'two'}", "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    assert [r["step"] for r in two] == list(range(1, 7))  # rank 0 alone wrote metrics
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["tokens"] == a["tokens"]  # global target count, not one rank's
    for a, b in zip(records(tmp_path / "one", "eval"), records(tmp_path / "two", "eval")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["parallel"]["strategy"] == "fsdp" and summary["world_size"] == 2
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert all(r["peak_mem_mb"] > 0 for r in summary["ranks"])
    assert proc.stdout.count("done:") == 1


def test_degrees_that_do_not_fit_the_world_fail_before_launch(capsys):
    code = main(["train", *TINY, "--parallel.dp_shard=4", "--nproc", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "parallel.dp_replicate × dp_shard × tp × pp = 4" in err[0]
    assert "world size is 2" in err[0]


@pytest.mark.parametrize("host_reads", ["every-step", "lagged"])
def test_sigterm_to_the_nproc_launcher_reaches_the_ranks_which_save(prepared, tmp_path,
                                                                    host_reads):
    """A scheduler stops a job by signalling the command it started (`scaletrain train
    --nproc 2`): the ranks must get the signal, save a checkpoint and exit 128+15.
    `lagged`: the all-reduced stop flag is read two steps later, at the same step on
    both ranks (else one would wait in a collective the other never joins)."""
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", "train", *TINY,
                             f"--data.prepared_dir={prepared}", "--train.steps=100000",
                             "--eval.interval=0", "--eval.test=false",
                             "--checkpoint.interval=0", f"--run.dir={run}", "--nproc", "2",
                             f"--train.host_reads={host_reads}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
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
    ckpts = [p for p in (run / "checkpoints").iterdir() if not p.name.endswith(".tmp")]
    assert len(ckpts) == 1, err[-2000:]
    assert "stopped by SIGTERM" in err


def test_lagged_host_reads_under_ddp_give_the_synchronous_losses(prepared, tmp_path):
    """DDP on 2 ranks: with `train.host_reads=lagged` (tokens, fault guard on the device,
    stop flag read late) the losses and token counts are those of the synchronous loop."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    got = {}
    for mode in ("every-step", "lagged"):
        run = tmp_path / mode
        proc = subprocess.run([sys.executable, "-m", "scaletrain", "train", *TINY,
                               f"--data.prepared_dir={prepared}", "--eval.test=false",
                               "--parallel.dp_replicate=2", "--parallel.dp_shard=1",
                               "--precision.dtype=fp32", f"--train.host_reads={mode}",
                               f"--run.dir={run}", "--nproc", "2"],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[mode] = [(r["step"], r["loss"], r["tokens"]) for r in records(run, "train")]
    assert len(got["lagged"]) == 6 and got["lagged"] == got["every-step"]
