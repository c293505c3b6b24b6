"""The end of an optimizer step, once for every mode: unscale -> penalty -> clip value ->
clip norm -> guard -> optimizer step -> zero grad -> after-step hook (MoE bias).

Shared by the plain / DDP / FSDP / TP step (train/step.py), the pipeline step
(parallel/pipeline_step.py) and the parameter server's update (paramserver/server.py),
so a change to the order (which the parity and resume tests check bitwise) is made in
one place. It takes every setting explicitly and imports nothing of the trainer, so the
lower layers can call it.

`StepEnd` holds the run's settings (what the config says: clipping, the penalty hook, the
fault guard), built once by the trainer and handed to the step paths, which call
`StepEnd.finish`. What differs by layout comes in at that call: the gradient norm of
sharded / pipelined gradients (`clip_norm`: train/step.py StepOptions.clip_norm, the
pipeline's over its group, the parameter server's coordinator coefficient), and the
parameters that the norm counts (`norm_params`: a pipeline's tied copies are counted once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# (params, max_norm) -> the global grad norm, after scaling the gradients to max_norm
# (math.inf: measure only), or None where the norm is measured elsewhere (the parameter
# server's coordinator hands each shard the global coefficient).
ClipNorm = Callable[[list, float], "torch.Tensor | None"]


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """torch's global-norm clip over plain (or all-DTensor) gradients."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


# (loss, grad norm) -> False: skip this update (train/faults.py)
Guard = Callable[[torch.Tensor, torch.Tensor], bool]


@dataclass
class StepEndResult:
    grad_norm: torch.Tensor | None  # before clipping; None where measured elsewhere
    skipped: bool  # the update was not applied (guard refused it, or fp16 overflow)


# What a whole step (train/step.py, parallel/pipeline_step.py) hands the loop.
@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's share of the step's mean loss (detached, fp32)
    grad_norm: torch.Tensor
    n_targets: torch.Tensor  # global count of target positions in the step
    skipped: bool = False  # fp16 overflow: the optimizer step was not applied


@dataclass(frozen=True)
class StepEnd:
    """The run's end-of-step settings, the same for every step path and layout."""

    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (norm still measured)
    grad_clip_value: float = 0.0  # elementwise clip; 0 = off
    # Adds the L1/L2 penalty gradient once per step (optim/penalties.py).
    add_penalty_grads: Callable[[], None] | None = None
    guard: Guard | None = None  # the fault guard (train/faults.py, train/device_guard.py)
    # Model state moved from the step's statistics after the update, outside the gradient
    # (the MoE balancing bias, models/moe_terms.py); called with whether it was applied.
    after_step: Callable[[bool], None] | None = None

    def finish(self, optimizer: torch.optim.Optimizer, params: list, *,
               clip_norm: ClipNorm = clip_grad_norm, norm_params: list | None = None,
               scaler: torch.amp.GradScaler | None = None,
               loss: torch.Tensor | None = None) -> StepEndResult:
        """`finish_step` with these settings and the layout's `clip_norm`."""
        done = finish_step(optimizer, params, scaler=scaler,
                           add_penalty_grads=self.add_penalty_grads,
                           grad_clip_value=self.grad_clip_value, grad_clip=self.grad_clip,
                           clip_norm=clip_norm, norm_params=norm_params, guard=self.guard,
                           loss=loss)
        if self.after_step is not None:
            self.after_step(not done.skipped)
        return done


def finish_step(optimizer: torch.optim.Optimizer, params: list, *,
                scaler: torch.amp.GradScaler | None = None,
                add_penalty_grads: Callable[[], None] | None = None,
                grad_clip_value: float = 0.0, grad_clip: float = 0.0,
                clip_norm: ClipNorm = clip_grad_norm, norm_params: list | None = None,
                guard: Guard | None = None,
                loss: torch.Tensor | None = None) -> StepEndResult:
    """Apply the step's accumulated gradients of `params` and zero them.

    `grad_clip` is the max global grad norm (0: measure only), `grad_clip_value` the
    elementwise clip (0: off). `guard(loss, grad_norm)` False skips the update
    (train/faults.py): the gradients are zeroed and nothing else changes."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and measure the true gradients
    if add_penalty_grads is not None:
        # The L1/L2 penalty gradient, once per step after unscaling and before clipping
        # (optim/penalties.py: once, not per micro-batch, keeps accumulation exact).
        add_penalty_grads()
    if grad_clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, grad_clip_value)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = clip_norm(params if norm_params is None else norm_params, max_norm)
    if guard is not None and not guard(loss, grad_norm):
        if scaler is not None:
            scaler.update()  # unscale_ recorded this step's inf checks; keep them in sync
        optimizer.zero_grad(set_to_none=True)
        return StepEndResult(grad_norm, skipped=True)
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skipped internally when a gradient is inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepEndResult(grad_norm, skipped)
