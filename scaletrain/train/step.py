"""One optimizer step: micro-batch loop -> clip -> optimizer step -> zero grad.

The loss of each micro-batch is its *sum* over target positions divided by the number of
target positions of the whole step (all micro-batches, and all data-parallel ranks when a
`count_reducer` is given). Summing the micro-batch gradients then gives exactly the
gradient of the one-big-batch mean loss, even when micro-batches hold unequal numbers of
targets; a mean of per-micro-batch means would weight tokens unequally.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from scaletrain.precision import PrecisionPolicy
from scaletrain.train.losses import count_targets, sum_cross_entropy

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepOptions:
    """What the step needs beyond the model and optimizer; set once by the trainer."""

    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (norm still measured)
    grad_clip_value: float = 0.0  # elementwise clip; 0 = off
    # Sums the step's target count over data-parallel ranks (identity on one process).
    count_reducer: Callable[[torch.Tensor], torch.Tensor] = lambda n: n
    # Context for every micro-batch but the last (DDP's no_sync: one all-reduce per step).
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # Gradients are averaged by DDP over ranks; multiplying the loss by the data-parallel
    # degree turns that average back into the sum the global normalisation needs.
    loss_multiplier: float = 1.0
    params: list[torch.nn.Parameter] = field(default_factory=list)


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's share of the step's mean loss (detached, fp32)
    grad_norm: torch.Tensor
    n_targets: torch.Tensor  # global count of target positions in the step
    skipped: bool = False  # fp16 overflow: the optimizer step was not applied
    n_targets_int: int = 0  # n_targets read on the host (filled in by the trainer)


def train_step(model: nn.Module, micro_batches: Iterable[Batch],
               optimizer: torch.optim.Optimizer, policy: PrecisionPolicy,
               scaler: torch.amp.GradScaler | None, opts: StepOptions) -> StepResult:
    micro_batches = list(micro_batches)
    local = sum(count_targets(y) for _, y in micro_batches)
    n_total = opts.count_reducer(local.clone())
    # Division in the loss dtype; the count is exact in fp32 up to 2**24 tokens per step.
    denom = n_total.to(torch.float64 if policy.param_dtype == torch.float64 else torch.float32)
    loss_sum = torch.zeros((), dtype=denom.dtype, device=denom.device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (contextlib.nullcontext() if last else opts.no_sync()):
            with policy.autocast():
                logits = model(x)
            loss = sum_cross_entropy(logits.to(denom.dtype), y) / denom
            scaled = loss * opts.loss_multiplier
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    params = opts.params or [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and measure the true gradients
    if opts.grad_clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, opts.grad_clip_value)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, opts.grad_clip if opts.grad_clip > 0 else math.inf, foreach=True)
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skipped internally when a gradient is inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, n_total, skipped)


def split_micro_batches(batch: Batch, micro: int) -> list[Batch]:
    """Split a rank's batch (B, ...) into B / micro micro-batches of `micro` samples."""
    x, y = batch
    return list(zip(x.split(micro), y.split(micro)))
