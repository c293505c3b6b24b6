"""`train.host_reads = "lagged"`: step values read one step late, the fault guard's skip
decided on the device (fused AdamW's found_inf). Compared with the synchronous loop
(`every-step`) on the CPU: the same losses, the same fault events at the same steps, the
same rollback, bitwise-equal final weights, the same token and skip counts."""

from __future__ import annotations

import torch

from scaletrain.train.host_reads import LaggedReads, resolve_lag
from tests.conftest import make_cfg, one_process_trainer


def test_values_are_consumed_one_step_late_and_all_on_flush():
    reads = LaggedReads(1, torch.device("cpu"))
    got = []
    reads.push(torch.tensor([1.0, 2.0]), got.append)
    reads.end_step()
    assert got == []  # step 1's values wait for the end of step 2
    reads.push(torch.tensor(3), got.append)
    reads.end_step()
    assert got == [[1.0, 2.0]]
    reads.push(torch.tensor(4), got.append)  # not yet closed: flush closes and reads it
    reads.flush()
    assert got == [[1.0, 2.0], [3], [4]]
    now = LaggedReads(0, torch.device("cpu"))
    now.push(torch.tensor(5), got.append)
    now.end_step()
    assert got[-1] == [5]
    assert resolve_lag("auto", torch.device("cpu")) == 0
    assert resolve_lag("auto", torch.device("cuda")) == 1
    assert resolve_lag("every-step", torch.device("cuda")) == 0


def run(tiny_args, tmp_path, mode: str, bad=(5, 6), interval=2):
    """By default the rollback scenario of test_faults.py: batches 5 and 6 give NaN
    logits, two bad steps in a row roll back to the step-4 checkpoint."""
    from scaletrain.metrics import read_metrics

    cfg = make_cfg(tiny_args + [f"--run.dir={tmp_path / mode}", "--train.steps=9",
                                f"--checkpoint.interval={interval}", "--faults.max_consecutive=2",
                                "--eval.test=false", "--train.threads=1",
                                "--precision.dtype=fp32", f"--train.host_reads={mode}"])
    trainer = one_process_trainer(cfg)
    bs = cfg.train.batch_size

    def poison(module, args, out):
        consumed = trainer.loader.state_dict()["pos"] // bs
        return out * float("nan") if module.training and consumed in bad else out

    trainer.model.register_forward_hook(poison)
    summary = trainer.fit()
    recs = read_metrics(str(tmp_path / mode / "metrics.jsonl"))
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return trainer, summary, recs, weights


def test_lagged_reads_and_device_guard_match_the_synchronous_loop(tiny_args, tmp_path):
    sync_tr, sync_sum, sync_recs, sync_w = run(tiny_args, tmp_path, "every-step")
    lag_tr, lag_sum, lag_recs, lag_w = run(tiny_args, tmp_path, "lagged")
    assert type(sync_tr.step_end.guard).__name__ == "method"  # FaultMonitor.guard
    assert type(lag_tr.step_end.guard).__name__ == "DeviceGuard"
    assert lag_tr.reads.lag == 1 and sync_tr.reads.lag == 0

    def faults(recs):
        return [(r["step"], r["event"]) for r in recs if r["kind"] == "fault"]

    def train(recs):
        return [(r["step"], r["loss"], r["tokens"]) for r in recs if r["kind"] == "train"]

    assert faults(sync_recs) == [(5, "nonfinite_loss"), (6, "nonfinite_loss"),
                                 (6, "rollback")]
    assert faults(lag_recs) == faults(sync_recs)
    assert train(lag_recs) == train(sync_recs)  # losses and token counts, exactly
    assert torch.equal(lag_w, sync_w)
    for key in ("steps", "tokens", "skipped_steps", "train_loss"):
        assert lag_sum[key] == sync_sum[key], key
    assert lag_sum["skipped_steps"] == 2


def test_a_lone_bad_step_is_skipped_on_the_device_and_logged_with_its_own_step(
        tiny_args, tmp_path):
    """No checkpoint in between: step 3's verdict reaches the host at the end of step 4,
    and is logged as step 3's."""
    out = {m: run(tiny_args, tmp_path, m, bad=(3,), interval=0)
           for m in ("every-step", "lagged")}
    for mode, (_, summary, recs, _) in out.items():
        assert [(r["step"], r["event"]) for r in recs if r["kind"] == "fault"] == \
            [(3, "nonfinite_loss")], mode
        assert summary["skipped_steps"] == 1
    assert torch.equal(out["lagged"][3], out["every-step"][3])
