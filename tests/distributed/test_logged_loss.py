"""`loss` in a train record of metrics.jsonl is the logged step's own loss in every mode
(issue 13 item 2): the mean over the step's target tokens, not a mean over the
log_interval window. Checked through the CLI at the DEFAULT log interval (10), where a
window mean and the step's loss differ, against one process on the same tokens per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_DATA, run_cli

# No train.log_interval here: the default (10) is what is tested. fp64 and no dropout, so
# layouts agree to rounding (~1e-14 relative after 20 steps, DESIGN.md §5) and any
# difference in what is logged shows far above the tolerance.
COMMON = TINY_DATA + ["--model.name=gpt", "--model.n_layer=2", "--model.n_head=2",
                      "--model.d_model=32", "--model.seq_len=32", "--model.dropout=0",
                      "--precision.dtype=fp64", "--train.batch_size=8",
                      "--train.micro_batch_size=4", "--train.steps=20", "--optim.lr=1e-2",
                      "--schedule.warmup_steps=0", "--train.progress=off",
                      "--eval.interval=0", "--eval.batches=2", "--eval.test=false"]
TOL = 1e-10  # relative; fp64 reduction-order differences between layouts are ~1e-14

MODES = {  # every mode a user can pick for --nproc, at 8 samples per step
    "ddp": ["--nproc", "2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
    "ps-sync": ["--nproc", "3", "--parallel.mode=ps", "--parallel.ps_servers=1"],
    "pipeline": ["--nproc", "2", "--parallel.pp=2"],
}


def train_losses(run_dir: Path, *args: str) -> dict[int, float]:
    proc = run_cli("train", *COMMON, f"--run.dir={run_dir}", *args, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def one_process(prepared_dir, tmp_path_factory) -> dict[int, float]:
    d = tmp_path_factory.mktemp("one")
    prep = f"--data.prepared_dir={prepared_dir}"
    losses = train_losses(d / "default", prep, "--train.threads=1")
    every = train_losses(d / "every", prep, "--train.threads=1", "--train.log_interval=1")
    assert sorted(losses) == [10, 20]
    # One process logs the step's own loss: the same value a log_interval=1 run gives.
    for step in (10, 20):
        assert losses[step] == pytest.approx(every[step], rel=TOL, abs=0)
    # The test can tell the two meanings apart: the window mean of steps 1-10 (what PS
    # used to log) is far outside the tolerance of step 10's loss.
    window = sum(every[s] for s in range(1, 11)) / 10
    assert abs(window - every[10]) > 1e6 * TOL * every[10]
    return losses


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_logs_the_step_loss(one_process, prepared_dir, tmp_path, mode):
    got = train_losses(tmp_path / "run", f"--data.prepared_dir={prepared_dir}", *MODES[mode])
    assert sorted(got) == [10, 20]
    for step in (10, 20):
        assert got[step] == pytest.approx(one_process[step], rel=TOL, abs=0), (mode, step)
