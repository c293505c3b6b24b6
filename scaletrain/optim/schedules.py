"""Learning-rate schedules as multipliers of the peak LR, driven by `LambdaLR`.

Each schedule is a closed-form function of the optimizer step t (0-based: the LR used by
step t+1): linear warmup over `warmup_steps` from lr/warmup to lr, then the decay, never
below `min_lr`. LambdaLR keeps the scheduler state (last_epoch) for checkpoints.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from scaletrain.config.schema import Config


def lr_multiplier(cfg: Config) -> Callable[[int], float]:
    s, lr = cfg.schedule, cfg.optim.lr
    warmup = s.warmup_steps
    decay = s.decay_steps or max(1, cfg.train.steps - warmup)
    floor = min(s.min_lr / lr, 1.0)

    def f(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / decay)
        if s.name == "constant":
            shape = 1.0
        elif s.name == "linear":
            shape = 1.0 - progress
        elif s.name == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown schedule {s.name}")
        return floor + (1.0 - floor) * shape

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
