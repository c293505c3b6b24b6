"""One optimizer step: micro-batch loop, then optim/step_end.py's `finish_step` (clip ->
optimizer step -> zero grad).

The loss of each micro-batch is its *sum* over target positions divided by the number of
target positions of the whole step (all micro-batches, and all data-parallel ranks when a
`count_reducer` is given). Summing the micro-batch gradients then gives exactly the
gradient of the one-big-batch mean loss, even when micro-batches hold unequal numbers of
targets; a mean of per-micro-batch means would weight tokens unequally.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from scaletrain.optim.step_end import clip_grad_norm, finish_step
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.losses import count_targets
from scaletrain.train.step_loss import StepLoss, default_step_loss

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
    # Adds the L1/L2 penalty gradient once per step, after unscaling and before clipping
    # (optim/penalties.py: once, not per micro-batch, keeps accumulation exact).
    add_penalty_grads: Callable[[], None] = lambda: None
    # Called after clipping, before the update: False skips it (numerical faults,
    # train/faults.py); the gradients are then zeroed and nothing else changes.
    guard: Callable[[torch.Tensor, torch.Tensor], bool] | None = None
    # The micro-batch loss, built once per run (train/step_loss.py: in-model loss,
    # cross-entropy on the logits, or distillation's custom loss).
    loss: StepLoss = default_step_loss
    # Tensor parallel (parallel/tensor.py): context around each micro-batch's forward,
    # loss and backward (loss_parallel: vocabulary-sharded logits), and the global grad
    # norm + clip of mixed DTensor/plain gradients; None = torch's clip_grad_norm_.
    loss_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    grad_norm_fn: Callable[[list, float], torch.Tensor] | None = None


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's share of the step's mean loss (detached, fp32)
    grad_norm: torch.Tensor
    n_targets: torch.Tensor  # global count of target positions in the step
    skipped: bool = False  # fp16 overflow: the optimizer step was not applied


def train_step(model: nn.Module, micro_batches: Iterable[Batch],
               optimizer: torch.optim.Optimizer, policy: PrecisionPolicy,
               scaler: torch.amp.GradScaler | None, opts: StepOptions) -> StepResult:
    micro_batches = list(micro_batches)
    local = sum(count_targets(y) for _, y in micro_batches)
    n_total = opts.count_reducer(local.clone())
    # Division in the loss dtype; the count is exact in fp32 up to 2**24 tokens per step.
    denom = n_total.to(loss_dtype(policy))
    loss_sum = accumulate_gradients(model, micro_batches, policy, opts.loss, denom,
                                    scaler=scaler, no_sync=opts.no_sync,
                                    loss_context=opts.loss_context,
                                    loss_multiplier=opts.loss_multiplier)
    params = opts.params or [p for p in model.parameters() if p.requires_grad]
    end = finish_step(optimizer, params, scaler=scaler,
                      add_penalty_grads=opts.add_penalty_grads,
                      grad_clip_value=opts.grad_clip_value, grad_clip=opts.grad_clip,
                      clip_norm=opts.grad_norm_fn or clip_grad_norm, guard=opts.guard,
                      loss=loss_sum)
    return StepResult(loss_sum, end.grad_norm, n_total, end.skipped)


def loss_dtype(policy: PrecisionPolicy) -> torch.dtype:
    """The dtype losses are summed and divided in: fp64 for fp64 runs, else fp32."""
    return torch.float64 if policy.param_dtype == torch.float64 else torch.float32


def accumulate_gradients(model: nn.Module, micro_batches: list[Batch],
                         policy: PrecisionPolicy, loss: StepLoss, denom: torch.Tensor, *,
                         scaler: torch.amp.GradScaler | None = None,
                         no_sync: Callable[[], contextlib.AbstractContextManager]
                         = contextlib.nullcontext,
                         loss_context: Callable[[], contextlib.AbstractContextManager]
                         = contextlib.nullcontext,
                         loss_multiplier: float = 1.0) -> torch.Tensor:
    """The micro-batch loop: forward, loss (a sum over targets) / `denom`, backward, for
    every micro-batch; the gradients accumulate in `.grad`. Returns the sum of the
    divided losses (detached, in `denom`'s dtype).

    Shared by the spmd step above (`denom`: the step's global target count) and the
    parameter server's workers (paramserver/worker.py: `denom` = 1, the gradient of the
    summed loss, which the servers divide by the update's count). `no_sync` wraps every
    micro-batch but the last (DDP), `loss_context` each one (TP's loss_parallel)."""
    loss_sum = torch.zeros((), dtype=denom.dtype, device=denom.device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (contextlib.nullcontext() if last else no_sync()), loss_context():
            mb_loss = loss(model, x, y, policy, denom.dtype)
            if hasattr(mb_loss, "full_tensor"):  # loss_parallel's replicated DTensor sum
                mb_loss = mb_loss.full_tensor()
            mb_loss = mb_loss / denom
            scaled = mb_loss * loss_multiplier
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += mb_loss.detach()
    return loss_sum


def split_micro_batches(batch: Batch, micro: int) -> list[Batch]:
    """Split a rank's batch (B, ...) into B / micro micro-batches of `micro` samples."""
    x, y = batch
    return list(zip(x.split(micro), y.split(micro)))
