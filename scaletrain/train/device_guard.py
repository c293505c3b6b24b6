"""The fault guard's skip decided on the device: no host sync inside the step.

`FaultMonitor.guard` (train/faults.py) reads the loss and gradient norm on the host to
decide whether to apply the update: one sync per step. Here the same test runs on the
device: bad = non-finite loss or norm, or loss > the spike threshold (a host float from
the accepted losses known so far), and the flag goes to torch's fused Adam/AdamW as its
`found_inf` argument, the tensor GradScaler uses for the same purpose: the fused kernel
then leaves parameters, moments and step count as they were (it undoes its step
increment), i.e. exactly a skipped step. The values reach the host one step later
(train/host_reads.py), where the monitor books them (history, consecutive count, the
event to log, with the step it belongs to) and the trainer counts the skip.

Applies to torch's fused Adam/AdamW (the default `optim.implementation = "auto"`) on
plain tensors without fp16 loss scaling; anything else keeps the host guard. (Fused SGD
is left out: a skipped first step would leave its momentum buffers uninitialised.)

With a lag the spike threshold of step k comes from the losses up to step k-2, not k-1:
one loss fewer in a window of `faults.spike_window`.
"""

from __future__ import annotations

from typing import Callable

import torch

from scaletrain.config.schema import FaultsConfig
from scaletrain.train.faults import FaultMonitor
from scaletrain.train.host_reads import LaggedReads


def device_guard_applies(optimizer: torch.optim.Optimizer, has_scaler: bool) -> bool:
    """Fused torch Adam/AdamW over plain tensors, no GradScaler."""
    if has_scaler or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if not optimizer.defaults.get("fused"):
        return False
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])


def fault_guard(cfg: FaultsConfig, optimizer: torch.optim.Optimizer, reads: LaggedReads,
                state, *, has_scaler: bool, loss_reducer) -> tuple[FaultMonitor, Callable]:
    """The run's fault monitor (train/faults.py) and the `StepOptions.guard` consulting
    it: the monitor's host check, or with lagged host reads (`train.host_reads`) and a
    fused Adam/AdamW the skip decided on the device. `state`: the run's TrainState, whose
    step numbers the booked faults and whose `skipped_steps` counts the device's skips;
    `loss_reducer`: the data-parallel sum of the loss shares."""
    monitor = FaultMonitor(cfg, has_scaler=has_scaler, loss_reducer=loss_reducer)
    if not (reads.lag and device_guard_applies(optimizer, has_scaler)):
        return monitor, monitor.guard

    def count_skip():
        state.skipped_steps += 1

    return monitor, DeviceGuard(monitor, optimizer, reads, step_of=lambda: state.step + 1,
                                on_skip=count_skip)


class DeviceGuard:
    """`StepOptions.guard` that flags a bad step to the fused optimizer on the device."""

    def __init__(self, monitor: FaultMonitor, optimizer: torch.optim.Optimizer,
                 reads: LaggedReads, step_of: Callable[[], int],
                 on_skip: Callable[[], None]):
        self.monitor, self.optimizer, self.reads = monitor, optimizer, reads
        self.step_of = step_of  # the number of the step being decided
        self.on_skip = on_skip
        # The flag is for this step's update only: cleared once the step has run.
        optimizer.register_step_post_hook(lambda opt, *_: setattr(opt, "found_inf", None))

    def __call__(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        m, c = self.monitor, self.monitor.cfg
        loss = loss_sum.detach().float().clone()
        if m.loss_reducer is not None:
            loss = m.loss_reducer(loss)
        norm = grad_norm.detach().float().reshape(())
        bad = torch.zeros((), dtype=torch.bool, device=loss.device)
        if c.skip_nonfinite:
            bad = bad | ~torch.isfinite(loss) | ~torch.isfinite(norm)
        limit = m.threshold()
        if limit is not None:
            bad = bad | (loss > limit)
        device = self.optimizer.param_groups[0]["params"][0].device
        self.optimizer.found_inf = bad.to(device=device, dtype=torch.float32)
        self.optimizer.grad_scale = None
        step = self.step_of()
        self.reads.push(torch.stack([loss, norm, bad.float()]),
                        lambda v: self._book(v, limit, step))
        return True  # the fused step itself skips a bad update

    def _book(self, values: list, limit, step: int) -> None:
        loss, norm, bad = values
        reason = None
        if bad:
            # The device's verdict is the truth (fp32 compare); the host names it.
            reason = self.monitor.classify(loss, norm, limit) or "loss_spike"
            self.on_skip()
        self.monitor.record(loss, norm, reason, step=step)
