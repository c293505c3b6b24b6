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
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from scaletrain.optim.step_end import ClipNorm, StepEnd, StepResult, clip_grad_norm
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.step_loss import StepLoss, default_step_loss

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepOptions:
    """What differs by layout in the micro-batch loop, set once by the trainer
    (parallel/context.py `DistContext.step_options`). The run's loss (train/step_loss.py)
    and end-of-step settings (optim/step_end.py `StepEnd`) are the same on every layout
    and come separately."""

    # Sums the step's target count over data-parallel ranks (identity on one process).
    count_reducer: Callable[[torch.Tensor], torch.Tensor] = lambda n: n
    # Context for every micro-batch but the last (DDP's no_sync: one all-reduce per step).
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # Gradients are averaged by DDP over ranks; multiplying the loss by the data-parallel
    # degree turns that average back into the sum the global normalisation needs.
    loss_multiplier: float = 1.0
    # The global grad norm (+ clip) of this layout's gradients: torch's for plain / DDP /
    # FSDP ones, parallel/tensor.py `parallel_grad_norm` for TP's mixed DTensor / plain.
    clip_norm: ClipNorm = clip_grad_norm


def train_step(model: nn.Module, micro_batches: Iterable[Batch],
               optimizer: torch.optim.Optimizer, policy: PrecisionPolicy,
               scaler: torch.amp.GradScaler | None, opts: StepOptions, *,
               step_loss: StepLoss = default_step_loss, end: StepEnd = StepEnd()
               ) -> StepResult:
    """One optimizer step over `micro_batches` with the run's loss and end of step."""
    micro_batches = list(micro_batches)
    step_loss.start_step()
    # Target tokens of the LM loss, pairs of DPO's (train/dpo.py): the step's divisor.
    local = sum(step_loss.count(y) for _, y in micro_batches)
    n_total = opts.count_reducer(local.clone())
    # Division in the loss dtype; the count is exact in fp32 up to 2**24 tokens per step.
    denom = n_total.to(loss_dtype(policy))
    loss_sum = accumulate_gradients(model, micro_batches, policy, step_loss, denom,
                                    scaler=scaler, no_sync=opts.no_sync,
                                    loss_multiplier=opts.loss_multiplier)
    params = [p for p in model.parameters() if p.requires_grad]
    done = end.finish(optimizer, params, clip_norm=opts.clip_norm, scaler=scaler,
                      loss=loss_sum)
    return StepResult(loss_sum, done.grad_norm, n_total, done.skipped)


def loss_dtype(policy: PrecisionPolicy) -> torch.dtype:
    """The dtype losses are summed and divided in: fp64 for fp64 runs, else fp32."""
    return torch.float64 if policy.param_dtype == torch.float64 else torch.float32


def accumulate_gradients(model: nn.Module, micro_batches: list[Batch],
                         policy: PrecisionPolicy, loss: StepLoss, denom: torch.Tensor, *,
                         scaler: torch.amp.GradScaler | None = None,
                         no_sync: Callable[[], contextlib.AbstractContextManager]
                         = contextlib.nullcontext,
                         loss_multiplier: float = 1.0) -> torch.Tensor:
    """The micro-batch loop: forward, loss (a sum over targets) / `denom`, backward, for
    every micro-batch; the gradients accumulate in `.grad`. Returns the sum of the
    divided losses (detached, in `denom`'s dtype).

    Shared by the spmd step above (`denom`: the step's global target count) and the
    parameter server's workers (paramserver/worker.py: `denom` = 1, the gradient of the
    summed loss, which the servers divide by the update's count). `no_sync` wraps every
    micro-batch but the last (DDP); the loss's own `context` each one (TP's
    loss_parallel, train/step_loss.py)."""
    loss_sum = torch.zeros((), dtype=denom.dtype, device=denom.device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (contextlib.nullcontext() if last else no_sync()), loss.context():
            mb_loss = loss(model, x, y, policy, denom.dtype) / denom
            extra = loss.extra()  # MoE terms: into the gradient, not into the logged loss
            total = mb_loss if extra is None else mb_loss + extra.to(denom.dtype) / denom
            scaled = total * loss_multiplier
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += mb_loss.detach()
    return loss_sum


def split_micro_batches(batch: Batch, micro: int) -> list[Batch]:
    """Split a rank's batch (B, ...) into B / micro micro-batches of `micro` samples."""
    x, y = batch
    return list(zip(x.split(micro), y.split(micro)))
