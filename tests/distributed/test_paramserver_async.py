"""Async parameter-server training through the CLI, as users run it (issue 13 item 1).

A worker's pull waits until its own earlier pushes are applied (coordinator.py). Before
that rule the applier, paused by the step-0 evaluation, fell behind the pushes for good:
workers spent the whole sample budget on the initial weights (staleness 1, 13, … 109,
the logged loss flat at its initial value). These tests bound the staleness by the
pull/push settings and tell fresh gradients from gradients at the initial weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import TINY_DATA, run_cli

# Tiny GPT. The evaluations (step 0 and every 10) pause the applier, as in the issue,
# where the step-0 one (4.6 s) outlasted the workers' whole sample budget: one-sample
# batches over the whole validation split (~0.7 s here) do that for this tiny model.
MODEL = ["--model.name=gpt", "--model.n_layer=2", "--model.n_head=2", "--model.d_model=32",
         "--model.seq_len=32", "--model.dropout=0", "--train.batch_size=8",
         "--train.micro_batch_size=4", "--train.log_interval=1", "--train.progress=off",
         "--schedule.warmup_steps=0", "--eval.interval=10", "--eval.batches=0",
         "--eval.batch_size=1", "--eval.test=false"]
PS = ["--parallel.mode=ps", "--parallel.ps_servers=1", "--parallel.ps_consistency=async"]


def train(args: list[str], run_dir: Path, nproc: int | None = None) -> tuple[dict, list]:
    """`scaletrain train ARGS [--nproc N]`: (summary, train records)."""
    launch = ["--nproc", str(nproc)] if nproc else ["--train.threads=1"]
    proc = run_cli("train", *args, f"--run.dir={run_dir}", *launch, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    return json.loads((run_dir / "summary.json").read_text()), records


def test_async_staleness_is_within_the_pull_push_bound(prepared_dir, tmp_path):
    pull, push, steps = 3, 1, 30
    args = TINY_DATA + MODEL + PS + [f"--data.prepared_dir={prepared_dir}",
                                     f"--train.steps={steps}",
                                     f"--parallel.ps_pull_every={pull}",
                                     f"--parallel.ps_push_every={push}"]
    summary, records = train(args, tmp_path / "run", nproc=2)  # one server, one worker
    # The bound. A gradient is computed on the parameters of the worker's last pull,
    # which hold every earlier push of its own (the pull waited for them). With one
    # worker, the only updates applied after that pull and before this gradient are its
    # own pushes made since the pull: at most ceil((P-1)/Q) of them (P = pull_every
    # steps between pulls, Q = push_every steps per push). Other workers would add the
    # updates they apply meanwhile, which depends on their speed: async bounds only
    # this part (ssp bounds the whole, test_paramserver.py::test_ssp_staleness_is_bounded).
    bound = math.ceil((pull - 1) / push)
    assert bound == 2
    assert all(r["staleness_max"] <= bound for r in records), \
        [r["staleness_max"] for r in records]
    # Exactly: one push per step, pulls at steps 0, 3, 6, …: the k-th step after a pull
    # is k updates stale — the bound is reached, not vacuous.
    assert summary["staleness_hist"] == {"0": 10, "1": 10, "2": 10}
    assert summary["ps_updates"] == steps


def test_async_trains_like_sync(prepared_dir, tmp_path):
    common = TINY_DATA + MODEL + [f"--data.prepared_dir={prepared_dir}", "--train.steps=20",
                                  "--optim.lr=1e-2"]
    # The reference: one process (= PS sync, test_paramserver.py checks that to 1e-12).
    single_sum, single = train(common, tmp_path / "single")
    asyn_sum, asyn = train(common + PS, tmp_path / "async", nproc=3)  # 2 workers, P = Q = 1
    # The control: pulls only before its first step, so every gradient is taken at the
    # initial weights — what the issue saw. The criterion below must reject it.
    _, never = train(common + PS + ["--parallel.ps_pull_every=1000000"],
                     tmp_path / "never", nproc=3)

    def decrease(records: list[dict]) -> float:
        """How far the logged train loss fell: step 1 minus the mean of the last 10
        steps (a mean, so one batch's noise, ~±0.07 here, does not decide)."""
        tail = [r["loss"] for r in records[-10:]]
        return records[0]["loss"] - sum(tail) / len(tail)

    def lag(records: list[dict]) -> float:
        """Mean over steps of (this run's logged loss - one process's). Step k of every
        run holds the same samples (async: give or take a step of one worker), so batch
        noise mostly cancels; what is left is how far behind (> 0) or ahead (< 0) the
        parameters the loss was taken at are."""
        return sum(r["loss"] - q["loss"] for r, q in zip(records, single)) / len(single)

    assert [r["step"] for r in asyn] == [r["step"] for r in single] == list(range(1, 21))
    ref = decrease(single)
    assert ref > 0.5  # 5.95 -> ~5.02 measured: long enough to see learning
    # Tolerances. Async makes n_workers = 2 Adam updates of half a batch per sync step at
    # the same LR (Adam's update is ~lr whatever the batch), so it may run ahead early:
    # measured lag -0.03, decrease 1.0x sync's (1.5x at lr 1e-3). A gradient a few
    # updates stale costs a bump (+0.4 once after 10 updates of staleness: +0.02 on the
    # mean). Gradients at the initial weights leave the logged loss where it started:
    # the control measured lag 0.73, decrease 0.007; the old code, whose workers spent
    # steps 1-10 (or all 20) at the initial weights during the step-0 evaluation,
    # lag 0.37-0.73. So: decrease at least half of sync's, lag at most 0.15.
    assert decrease(asyn) >= 0.5 * ref, (decrease(asyn), ref)
    assert lag(asyn) <= 0.15, lag(asyn)
    assert decrease(never) < 0.5 * ref and lag(never) > 0.15, (decrease(never), lag(never))
    # The final model too (whole validation split, deterministic): measured async 5.041
    # vs sync 5.017 (0.5%); 2% leaves room for the run-to-run staleness pattern.
    assert asyn_sum["val"]["loss"] == pytest.approx(single_sum["val"]["loss"], rel=0.02)
    assert asyn_sum["tokens"] == single_sum["tokens"]  # the same samples
    # The control's logged staleness reads as the did: it grows with the run
    # (every gradient is on version 0), so staleness measures what the bound above says.
    assert max(r["staleness_max"] for r in never) > 20
