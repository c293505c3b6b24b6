"""The micro-batch loss of a run, chosen once when the run is built: (model, inputs,
targets, policy, loss dtype) -> the loss *summed* over target positions (train/step.py
divides by the step's global count).

Three kinds, decided by the config, not per micro-batch:
- in-model: `model(x, targets=y)` returns the summed cross-entropy itself (GPT.head_loss;
  with train.compile the head and loss are one compiled region);
- cross-entropy on the model's logits as they are (bf16 under autocast): the loss upcasts
  inside, so that with train.compile the cast, log-softmax and NLL fuse (parallel/compile.py);
- a custom loss (distillation, compress/distill.py): (logits, inputs, targets) -> summed
  loss, handed the logits in the loss dtype.
TP's loss-parallel is a layout context around the forward and backward
(`StepOptions.loss_context`), not a loss of its own.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import sum_cross_entropy

StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, PrecisionPolicy, torch.dtype],
                    torch.Tensor]
CustomLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_step_loss(loss_fn: CustomLoss | None = None,
                    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    = sum_cross_entropy, loss_in_model: bool = False) -> StepLoss:
    """The run's micro-batch loss: the in-model loss where the model computes it
    (`loss_in_model`: the caller sets it only for the default loss), else `loss_fn` if
    given, else `cross_entropy` on the logits."""
    if loss_in_model:
        def in_model(model, x, y, policy, loss_dtype):
            with policy.autocast():  # the loss upcasts the logits itself
                return model(x, targets=y)
        return in_model
    if loss_fn is not None:
        def custom(model, x, y, policy, loss_dtype):
            with policy.autocast():
                logits = model(x)
            return loss_fn(logits.to(loss_dtype), x, y)
        return custom

    def on_logits(model, x, y, policy, loss_dtype):
        with policy.autocast():
            logits = model(x)
        return cross_entropy(logits, y)
    return on_logits


default_step_loss = build_step_loss()
