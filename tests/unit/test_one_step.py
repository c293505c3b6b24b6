"""Issue 14 item 3, one step: StepOptions holds only what differs by layout, the run's
loss (train/step_loss.py StepLoss, TP's loss-parallel context included) is what both the
plain step and the pipeline's last stage compute, and the end-of-step settings are one
StepEnd (optim/step_end.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from scaletrain.config import build_config
from scaletrain.errors import ConfigError
from scaletrain.optim.step_end import StepEnd
from scaletrain.parallel.pipeline_step import Pipeline
from scaletrain.parallel.world_checks import check_world
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import sum_cross_entropy
from scaletrain.train.step import StepOptions, train_step
from scaletrain.train.step_loss import StepLoss

CPU = PrecisionPolicy("fp32", torch.device("cpu"))


def test_step_options_are_the_layout_s_only():
    assert [f.name for f in dataclasses.fields(StepOptions)] == [
        "count_reducer", "no_sync", "loss_multiplier", "clip_norm"]


def test_the_pipeline_s_last_stage_computes_the_run_s_loss():
    """The schedule's loss_fn(logits, targets) is the run's StepLoss.on_logits, handed
    the logits in the loss dtype and no inputs, over the step's count, times dp."""
    seen = []

    def on_logits(logits, x, y, loss_dtype):
        seen.append((logits.dtype, x, loss_dtype))
        return logits.sum() * 3.0
    pipe = SimpleNamespace(step_loss=StepLoss(on_logits), denom=torch.tensor(4.0),
                           loss_multiplier=2.0)
    logits = torch.randn(2, 3, 5).bfloat16()
    got = Pipeline._loss(pipe, logits, torch.zeros(2, 3, dtype=torch.long))
    assert seen == [(torch.float32, None, torch.float32)]
    assert torch.equal(got, logits.float().sum() * 3.0 / 4.0 * 2.0)


def test_train_step_holds_the_loss_s_context_around_forward_and_backward():
    """TP's loss_parallel is the loss's context: the loss and its backward run in it."""
    torch.manual_seed(0)
    model = torch.nn.Embedding(7, 7)
    state = {"inside": False, "in_backward": []}

    @contextlib.contextmanager
    def context():
        state["inside"] = True
        yield
        state["inside"] = False

    def on_logits(logits, x, y, loss_dtype):
        assert state["inside"]
        logits.register_hook(lambda g: state["in_backward"].append(state["inside"]))
        return sum_cross_entropy(logits, y)
    x, y = torch.randint(0, 7, (2, 3)), torch.randint(0, 7, (2, 3))
    train_step(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), CPU, None,
               StepOptions(), step_loss=StepLoss(on_logits, context=context),
               end=StepEnd(grad_clip=1.0))
    assert state["in_backward"] == [True] and not state["inside"]


def test_distillation_with_a_pipeline_is_refused_before_launch():
    """The last stage sees logits only, not the inputs a teacher reads."""
    cfg = build_config(None, [("parallel.pp", "2"), ("model.n_layer", "2"),
                              ("distill.teacher", "/some/teacher")])
    with pytest.raises(ConfigError, match="distill.teacher with parallel.pp > 1"):
        check_world(cfg, 2)
