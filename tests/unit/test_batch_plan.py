"""The run's batch plan (config/batch_plan.py) is computed once and drives activation
checkpointing: under full-batch descent the budget is sized for the micro-batch the step
runs (the whole split per rank), not for train.batch_size."""

from __future__ import annotations

import pytest

from scaletrain.config.batch_plan import batch_plan
from scaletrain.config.checks import accumulation_steps
from scaletrain.data.build import build_data
from scaletrain.errors import ConfigError
from scaletrain.parallel.ac import block_modes, kept_bytes
from scaletrain.plan.memory import ac_policy
from tests.conftest import make_cfg, one_process_trainer


def test_plan_of_each_descent_mode(tiny_args):
    def tiny_cfg_with(*extra):
        return make_cfg(tiny_args + list(extra))

    mini = batch_plan(tiny_cfg_with("--train.micro_batch_size=2"), dp=2, pp=1)
    assert (mini.full, mini.per_rank, mini.micro, mini.accum) == (8, 4, 2, 2)
    sgd = batch_plan(tiny_cfg_with("--train.descent=stochastic"), dp=1, pp=1)
    assert (sgd.full, sgd.micro, sgd.accum) == (1, 1, 1)
    full = batch_plan(tiny_cfg_with("--train.descent=full-batch",
                                    "--train.micro_batch_size=40"), dp=1,
                      n_train=100, pp=1)
    assert (full.full, full.micro, full.accum) == (100, 40, 3)  # the last one smaller
    # validation's count is the plan's
    assert accumulation_steps(tiny_cfg_with("--train.micro_batch_size=2")) == 4


@pytest.mark.parametrize("pp,extra,head_micro", [
    (1, [], 2),  # no pipeline: the head runs each accumulation micro-batch
    (2, [], 2),  # per-rank 8 / (8 // 2 = 4 pipeline micro-batches)
    (2, ["--parallel.pp_microbatches=2"], 4),  # 8 / 2: the schedule's, not micro's
    (2, ["--parallel.pp_microbatches=8"], 1),
])
def test_head_micro_is_the_pipelines_micro_batch(tiny_args, pp, extra, head_micro):
    """BatchPlan.head_micro, the samples the output head sees per forward (what
    model.loss_chunks=-1 is resolved from by the trainer and `plan`): the micro-batch,
    or under a pipeline per-rank batch / parallel.pp_microbatches."""
    cfg = make_cfg(tiny_args + ["--train.micro_batch_size=2", *extra])
    batch = batch_plan(cfg, dp=1, pp=pp)
    assert (batch.per_rank, batch.micro, batch.head_micro) == (8, 2, head_micro)


def test_pipeline_microbatches_that_do_not_divide_the_batch_are_refused(tiny_args):
    cfg = make_cfg(tiny_args + ["--parallel.pp_microbatches=3"])
    with pytest.raises(ConfigError, match="pp_microbatches=3 must divide"):
        batch_plan(cfg, dp=1, pp=2)
    assert batch_plan(cfg, dp=1, pp=1).head_micro == 8  # no pipeline: not read


def test_full_batch_ac_budget_is_sized_for_the_whole_split(tiny_args):
    """A budget that keeps every block at train.batch_size's 8 samples must checkpoint
    at the split's micro-batch: the trainer's modes are those of the split's plan."""
    args = tiny_args + ["--train.descent=full-batch", "--model.n_layer=4"]
    n_train = len(build_data(make_cfg(args), progress=False).train)
    assert n_train > 8
    sizing = make_cfg(args + ["--parallel.activation_checkpoint=budget",
                              "--parallel.activation_budget_gib=1"])
    at_split = ac_policy(sizing, 1, n_train).block_bytes
    at_batch = ac_policy(sizing, 1, 8).block_bytes
    # Above the floor at the split's micro-batch, above "no checkpointing" at 8 samples.
    budget = max(1.5 * kept_bytes(["full"] * 4, at_split),
                 2 * kept_bytes(["none"] * 4, at_batch))
    assert budget < kept_bytes(["none"] * 4, at_split)
    cfg = make_cfg(args + ["--parallel.activation_checkpoint=budget",
                           f"--parallel.activation_budget_gib={budget / 2**30!r}"])
    tr = one_process_trainer(cfg)
    assert tr.batch.micro == n_train
    expected = block_modes(ac_policy(cfg, 1, n_train), 4)
    assert set(expected) != {"none"}
    assert tr.ac_modes == expected
