"""Numerical fault recovery: skip bad steps, roll back after too many in a row.

A step is *bad* when its loss or gradient norm is NaN/inf, or when its loss spikes above
mean + k·std of the recent accepted losses (`faults.spike_sigmas`, over the last
`faults.spike_window` steps, once `faults.spike_min_history` are known). A bad step's
update is not applied: `train_step` calls :meth:`FaultMonitor.guard` after clipping and
before `optimizer.step()`, and on a veto zeroes the gradients instead (parameters and
optimizer state are untouched, so a skipped batch is exactly as if it was never seen).
After `faults.max_consecutive` bad steps in a row the trainer rolls back to the newest
valid checkpoint, keeps the data loader where it is (the offending batches are skipped,
as PaLM did: Chowdhery et al. 2022, §5.1) and optionally lowers the learning rate.

Cost: the check reads the loss and gradient norm on the host, one sync per step; on CPU
that is free, on a GPU it removes the step's launch-ahead slack (the logger reads them
at log steps anyway). With several data-parallel ranks the loss is summed over ranks
first (each rank holds its share of the global mean), so every rank takes the same
decision. Only over the data-parallel ranks (`loss_reducer`, the trainer's
`DistContext.sum_reducer`): tensor-parallel ranks hold the same share, and a pipeline's
step already shares the last stage's loss with every stage (parallel/pipeline_step.py),
so a sum over the whole world would count it tp x pp times.

With fp16 loss scaling a non-finite gradient is an overflow the GradScaler handles by
itself (it skips the step and lowers the scale); it is not counted as a fault here.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

from scaletrain.config.schema import FaultsConfig


class FaultMonitor:
    """Decides, per step, whether the update may be applied; holds the spike history."""

    def __init__(self, cfg: FaultsConfig, *, has_scaler: bool = False,
                 loss_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cfg = cfg
        self.has_scaler = has_scaler
        # Sums the loss shares over the data-parallel ranks; None: over the whole world.
        self.loss_reducer = loss_reducer
        self.history: deque[float] = deque(maxlen=cfg.spike_window)
        self.consecutive = 0  # bad steps in a row
        self.last_event: dict | None = None

    # -- the decision (called inside train_step) ---------------------------------------
    def guard(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True to apply the update; False to skip it (the event is kept for the log)."""
        loss = loss.detach().float()
        if self.loss_reducer is not None:
            loss = self.loss_reducer(loss.clone())
        elif dist.is_available() and dist.is_initialized():
            loss = loss.clone()
            dist.all_reduce(loss)  # shares of the global mean -> the global mean
        loss_v, norm_v = float(loss), float(grad_norm)  # the host sync
        reason = self.classify(loss_v, norm_v)
        self.record(loss_v, norm_v, reason)
        return reason is None

    def record(self, loss: float, grad_norm: float, reason: str | None,
               step: int | None = None) -> None:
        """Book a decided step: an accepted loss joins the history; a bad step is kept
        as the event to log (`step`: its own, when it is logged later)."""
        if reason is None:
            self.history.append(loss)
            self.consecutive = 0
            self.last_event = None
            return
        self.consecutive += 1
        self.last_event = {"event": reason, "loss": loss, "grad_norm": grad_norm,
                           "consecutive": self.consecutive}
        if step is not None:
            self.last_event["step"] = step

    def classify(self, loss: float, grad_norm: float, limit=...) -> str | None:
        """'nonfinite_loss' | 'nonfinite_grad_norm' | 'loss_spike' | None (a good step).
        `limit`: the spike threshold (default: the current one)."""
        c = self.cfg
        if c.skip_nonfinite:
            if not math.isfinite(loss):
                return "nonfinite_loss"
            if not math.isfinite(grad_norm) and not self.has_scaler:
                return "nonfinite_grad_norm"
        if limit is ...:
            limit = self.threshold()
        if limit is not None and loss > limit:
            return "loss_spike"
        return None

    def threshold(self) -> float | None:
        """The loss above which the next step counts as a spike (None: not armed)."""
        c = self.cfg
        if c.spike_sigmas <= 0 or len(self.history) < c.spike_min_history:
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        return mean + c.spike_sigmas * math.sqrt(sum((x - mean) ** 2 for x in self.history) / n)

    # -- after the step (called by the trainer) ----------------------------------------
    def pop_event(self) -> dict | None:
        """The fault of the last step, if any (then cleared)."""
        ev, self.last_event = self.last_event, None
        return ev

    def should_roll_back(self) -> bool:
        return self.cfg.max_consecutive > 0 and self.consecutive >= self.cfg.max_consecutive

    def count_afresh(self) -> None:
        """A rollback found no checkpoint to go back to: the bad steps in a row are
        counted from 0 again (the run keeps skipping them)."""
        self.consecutive = 0

    # -- checkpointed state ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive}

    def load_state_dict(self, d: dict) -> None:
        self.history = deque((float(x) for x in d.get("history", [])),
                             maxlen=self.cfg.spike_window)
        self.consecutive = int(d.get("consecutive", 0))


def roll_back(manager, loader, scheduler, optimizer, lr_factor: float) -> int | None:
    """Restore the newest valid checkpoint but keep the loader's position.

    Returns the step rolled back to, or None when there is no checkpoint to go back to.
    The batches between the checkpoint and now are skipped (never replayed): replaying
    the data that led to the divergence would likely diverge again.
    """
    target = manager.newest_valid()
    if target is None:
        return None
    position = loader.state_dict()
    path, m = target
    manager.load(path, m)
    loader.load_state_dict(position)
    scale_lr(scheduler, optimizer, lr_factor)
    return m["step"]


def scale_lr(scheduler, optimizer, lr_factor: float) -> None:
    """`faults.rollback_lr_factor` after a rollback: the schedule's base LRs and the
    current LR of every group scaled, so the rest of the schedule runs lower too (the
    spmd rollback here, each PS server on its shard: paramserver/server.py)."""
    if lr_factor != 1.0:
        scheduler.base_lrs = [b * lr_factor for b in scheduler.base_lrs]
        for g in optimizer.param_groups:
            g["lr"] *= lr_factor


class Rollback:
    """What `faults.max_consecutive` bad steps in a row do; the checkpoint session
    calls it with its manager (checkpoint/session.py) and logs the outcome.

    Restores the newest valid checkpoint (`roll_back`: the loader keeps its position, the
    LR is scaled by `lr_factor`) and keeps the skipped-step count, which counts every
    skipped step, rolled back over or not. Returns the step rolled back to, or None when
    there is no checkpoint: then the bad steps in a row are counted afresh (the run keeps
    skipping them).
    """

    def __init__(self, monitor: FaultMonitor, loader, scheduler, optimizer, state,
                 lr_factor: float):
        self.monitor, self.loader, self.state = monitor, loader, state
        self.scheduler, self.optimizer = scheduler, optimizer
        self.lr_factor = lr_factor

    def __call__(self, manager) -> int | None:
        skipped = self.state.skipped_steps
        to = roll_back(manager, self.loader, self.scheduler, self.optimizer, self.lr_factor)
        if to is None:
            self.monitor.count_afresh()
            return None
        self.monitor.pop_event()  # a flushed later step's: rolled back over, not logged
        self.state.skipped_steps = skipped  # the count survives the rollback
        return to
