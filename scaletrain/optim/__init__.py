"""Optimizers and learning-rate schedules."""

from scaletrain.optim.optimizers import build_optimizer, param_groups
from scaletrain.optim.schedules import build_scheduler, lr_multiplier

__all__ = ["build_optimizer", "param_groups", "build_scheduler", "lr_multiplier"]
