"""Optimizers, learning-rate schedules, batch rules and weight penalties."""

from scaletrain.optim.optimizers import build_optimizer, param_groups
from scaletrain.optim.schedules import build_scheduler, lr_multiplier, observe_val_loss

__all__ = ["build_optimizer", "param_groups", "build_scheduler", "lr_multiplier",
           "observe_val_loss"]
