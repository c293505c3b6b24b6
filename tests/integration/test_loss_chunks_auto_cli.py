"""`scaletrain train --model.loss_chunks=-1` (auto): the run chunks its
head + loss where a micro-batch's fp32 logits reach 32 MiB (models/loss_chunks_auto.py),
judged on the head's micro-batch (BatchPlan.head_micro: a pipeline's own under pp > 1),
not the batch, and `plan` predicts the same choice."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_cfg, run_cli

# 2 pipeline stages, the schedule's 2 micro-batches of 4 samples out of the rank's 8
PP2 = ["--nproc=2", "--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"]


@pytest.mark.parametrize("micro,layout,chunks", [
    (8, [], 8),
    (4, [], 0),
    # train.micro_batch_size 8 would chunk; the head sees the pipeline's 4 samples
    (8, PP2, 0),
])
def test_auto_loss_chunks_resolved_per_micro_batch(tiny_args, tmp_path, micro, layout,
                                                   chunks):
    from scaletrain.config.dims import resolve_dims
    from scaletrain.plan.report import plan

    # 8 x seq 32 x vocab 32768 x 4 B = 32 MiB of logits per micro-batch of 8: chunked;
    # micro-batches of 4 (16 MiB, the batch of 8 still 32 MiB) are not
    args = tiny_args + ["--model.loss_chunks=-1", "--model.vocab_size=32768",
                        f"--train.micro_batch_size={micro}",
                        "--train.steps=1", "--eval.test=false", "--train.device=cpu"]
    proc = run_cli("train", *args, *layout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss_chunks"] == chunks
    cfg = make_cfg(args + layout[1:])  # the layout's settings, without --nproc
    world = 2 if layout else 1
    assert plan(cfg, resolve_dims(cfg.parallel, world), 32768)["loss_chunks"] == chunks
