"""Learning-rate schedules: closed-form multipliers of the peak LR, plus `plateau`.

Every schedule except `plateau` is a closed-form function m(t) of the 0-based optimizer
step t (m(t) scales the peak LR used by step t+1), run by `torch.optim.lr_scheduler.
LambdaLR`. Why LambdaLR rather than `StepLR`, `CosineAnnealingLR`, ... directly: those
are "chainable" — each step derives the new LR from the previous one — so composing them
with a warmup and a `min_lr` floor needs `SequentialLR` plus clamping that their
recursions do not know about, and their values drift from the definition by rounding.
A closed form is exact at every step, and the LambdaLR state (`last_epoch`) is all a
checkpoint needs. tests/unit/test_schedules.py checks that each multiplier equals the
torch class of the same name step by step, so the definitions are the library's.

Warmup: t < W gives (t+1)/W (linear from lr/W up to lr). After it, with d = t - W the
step within the decay, D = `decay_steps` (0: train.steps - W) and f = min_lr / lr:

  constant      1
  step          max(f, γ^⌊d/step_size⌋)                                  (StepLR)
  multistep     max(f, γ^#{milestones ≤ d})                              (MultiStepLR)
  exponential   max(f, γ^d), or max(f, e^(−k·d)) when decay_rate k > 0   (ExponentialLR)
  inverse_time  max(f, 1 / (1 + k·⌊d/E⌋)), E = epoch_steps (1: per step)
  linear        f + (1−f)·(1−p),  p = min(1, d/D)                        (LinearLR)
  polynomial    f + (1−f)·(1−p)^power; power 2 = "square decay"          (PolynomialLR)
  cosine        f + (1−f)·½(1+cos πp); with restart_steps T₀ (and restart_mult),
                p = position within the current cycle  (CosineAnnealing[WarmRestarts]LR)
  wsd           1 until the last decay_fraction·D steps, then f + (1−f)·shape(q),
                q in [0, 1) over those steps, shape linear 1−q | cosine | sqrt 1−√q
                (warmup–stable–decay: Hu et al. 2024 "MiniCPM"; Hägele et al. 2024)
  onecycle      torch's OneCycleLR (cosine annealing, no warmup of its own):
                from 1/div_factor up to 1 over pct_start·T steps, then down to f
                (f = min_lr/lr, or 1/(div_factor·1e4) when min_lr is 0)  (OneCycleLR)

Multiplicative schedules (step … inverse_time) are clamped at the floor; annealing ones
(linear … wsd) decay *to* the floor, as `CosineAnnealingLR(eta_min=)` does.

`plateau` multiplies the LR by γ when the validation loss has not improved (relative
`threshold`) for more than `patience` evaluations, never below min_lr; the counting is
torch's `ReduceLROnPlateau`. The trainer reports each validation loss through
`scheduler.observe(loss)` (a no-op for the closed forms). Losses seen during warmup are
not counted: the LR is still rising, so "no improvement" says nothing about it yet.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from scaletrain.config.schema import Config
from scaletrain.optim.batch_rules import scaled_lr

ONECYCLE_FINAL_DIV = 1e4  # OneCycleLR's default final_div_factor


def peak_lr(cfg: Config) -> float:
    """The peak LR after batch-size scaling (see optim/batch_rules.py)."""
    return scaled_lr(cfg)


def decay_length(cfg: Config) -> int:
    """D: steps of the decay phase (after warmup)."""
    s = cfg.schedule
    return s.decay_steps or max(1, cfg.train.steps - s.warmup_steps)


def _cosine_restart_position(d: int, t0: int, mult: int) -> tuple[int, int]:
    """(steps into the current cycle, cycle length) with cycles t0, t0*mult, t0*mult², ...

    Integer arithmetic, so no log() rounding decides which cycle a step is in
    (CosineAnnealingWarmRestarts uses floats for the same thing).
    """
    length = t0
    while d >= length:
        d -= length
        length *= mult
    return d, length


def decay_shape(cfg: Config, steps_per_epoch: int = 1,
                peak: float | None = None) -> Callable[[int], float]:
    """m(d) for d >= 0 steps after warmup, floor included (see the module docstring).

    `peak`: the LR the multipliers scale (default: the batch-scaled optim.lr)."""
    s = cfg.schedule
    lr = peak if peak is not None else peak_lr(cfg)
    f = min(s.min_lr / lr, 1.0)
    D = decay_length(cfg)
    name = s.name

    if name == "constant":
        return lambda d: 1.0
    if name == "step":
        return lambda d: max(f, s.gamma ** (d // s.step_size))
    if name == "multistep":
        ms = sorted(s.milestones)
        return lambda d: max(f, s.gamma ** bisect.bisect_right(ms, d))
    if name == "exponential":
        if s.decay_rate > 0:
            return lambda d: max(f, math.exp(-s.decay_rate * d))
        return lambda d: max(f, s.gamma ** d)
    if name == "inverse_time":
        epoch = s.epoch_steps or max(1, steps_per_epoch)
        return lambda d: max(f, 1.0 / (1.0 + s.decay_rate * (d // epoch)))
    if name == "linear":
        return lambda d: f + (1.0 - f) * (1.0 - min(1.0, d / D))
    if name == "polynomial":
        return lambda d: f + (1.0 - f) * (1.0 - min(1.0, d / D)) ** s.power
    if name == "cosine":
        if s.restart_steps:
            def cosine_restarts(d: int) -> float:
                cur, length = _cosine_restart_position(d, s.restart_steps, s.restart_mult)
                return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * cur / length))
            return cosine_restarts
        return lambda d: f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, d / D)))
    if name == "wsd":
        n_decay = max(1, round(s.decay_fraction * D))
        start = D - n_decay
        shapes = {"linear": lambda q: 1.0 - q,
                  "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
                  "sqrt": lambda q: 1.0 - math.sqrt(q)}
        shape = shapes[s.decay_shape]

        def wsd(d: int) -> float:
            if d < start:
                return 1.0
            return f + (1.0 - f) * shape(min(1.0, (d - start) / n_decay))
        return wsd
    if name == "onecycle":
        return _onecycle(cfg, D, f)
    raise ValueError(f"schedule {name!r} has no closed form")  # validation prevents this


def _onecycle(cfg: Config, total: int, f: float) -> Callable[[int], float]:
    """OneCycleLR's two-phase cosine form (torch/optim/lr_scheduler.py, three_phase=False),
    as multipliers of max_lr."""
    s = cfg.schedule
    initial = 1.0 / s.div_factor
    final = f if s.min_lr > 0 else initial / ONECYCLE_FINAL_DIV
    up_end = float(s.pct_start * total) - 1  # OneCycleLR's phase boundaries, in steps
    down_end = float(total - 1)

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def onecycle(d: int) -> float:
        d = min(d, total - 1)  # hold the final LR if the run is longer than the cycle
        if d <= up_end:
            return anneal(initial, 1.0, d / up_end)
        return anneal(1.0, final, (d - up_end) / (down_end - up_end))
    return onecycle


def lr_multiplier(cfg: Config, steps_per_epoch: int = 1,
                  peak: float | None = None) -> Callable[[int], float]:
    """m(t): the factor of the peak LR used by step t+1 (t 0-based), warmup included."""
    warmup = cfg.schedule.warmup_steps
    shape = decay_shape(cfg, steps_per_epoch, peak)

    def m(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return shape(t - warmup)
    return m


class ClosedFormLR(LambdaLR):
    """LambdaLR over `lr_multiplier`; `observe` is the trainer's validation hook."""

    def observe(self, val_loss: float) -> None:
        """Closed-form schedules do not depend on the validation loss."""


class PlateauLR:
    """Linear warmup, then `ReduceLROnPlateau` driven by `observe(val_loss)`.

    Same interface as an LR scheduler: `step()` once per optimizer step, `get_last_lr()`,
    `state_dict()` / `load_state_dict()` (the torch plateau counters + the step count;
    the current LR itself lives in the optimizer's param groups, as for every scheduler).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config):
        s = cfg.schedule
        self.optimizer = optimizer
        self.warmup = s.warmup_steps
        self.base_lrs = [g["initial_lr"] if "initial_lr" in g else g["lr"]
                         for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self.last_epoch = 0
        self.plateau = ReduceLROnPlateau(optimizer, mode="min", factor=s.gamma,
                                         patience=s.patience, threshold=s.threshold,
                                         min_lr=s.min_lr)
        self._set_warmup_lr()

    def _set_warmup_lr(self) -> None:
        if self.last_epoch <= self.warmup:  # the step that ends warmup sets the peak once
            m = (self.last_epoch + 1) / self.warmup if self.last_epoch < self.warmup else 1.0
            for g, base in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = base * m

    def step(self) -> None:
        """Advance one optimizer step (warmup only; decay comes from `observe`)."""
        self.last_epoch += 1
        self._set_warmup_lr()

    def observe(self, val_loss: float) -> None:
        """Count a validation loss; reduces the LR of the next steps after `patience`."""
        if self.last_epoch >= self.warmup:
            self.plateau.step(val_loss)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs),
                "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self.plateau.load_state_dict(state["plateau"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int = 1):
    """The scheduler of `cfg.schedule` over `optimizer` (whose group LRs are the peak).

    `steps_per_epoch` (optimizer steps in one pass over the train split) is used by
    `inverse_time` with `schedule.epoch_steps = 0`.
    """
    if cfg.schedule.name == "plateau":
        return PlateauLR(optimizer, cfg)
    peak = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    return ClosedFormLR(optimizer, lr_multiplier(cfg, steps_per_epoch, peak))


def observe_val_loss(scheduler, val_loss: float) -> None:
    """The trainer's hook after each validation: schedules that need the loss see it."""
    observe = getattr(scheduler, "observe", None)
    if observe is not None:
        observe(val_loss)
