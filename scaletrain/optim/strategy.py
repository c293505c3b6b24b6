"""The training strategy of a config, built in one place for the trainer: optimizer
(batch-scaled LR, fp32 master weights when the precision needs them), LR scheduler,
batch plan (descent mode, ramp) and the L1/L2 penalty hook of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from scaletrain.config.schema import Config
from scaletrain.config.batch_plan import BatchPlan
from scaletrain.optim.batch_rules import scaled_lr
from scaletrain.optim.optimizers import build_optimizer, decayed_params
from scaletrain.optim.penalties import build_penalty
from scaletrain.optim.schedules import build_scheduler
from scaletrain.precision import PrecisionPolicy


@dataclass
class Strategy:
    optimizer: torch.optim.Optimizer
    scheduler: object  # LambdaLR subclass or PlateauLR: step/observe/state_dict/load_state_dict
    batch_plan: BatchPlan
    penalty: Callable[[], None]  # StepOptions.add_penalty_grads


def build_strategy(cfg: Config, model: nn.Module, policy: PrecisionPolicy, n_train: int,
                   plan: BatchPlan, embedding_copies=()) -> Strategy:
    """Everything above for `model`, a train split of `n_train` samples and the run's
    batch plan (`embedding_copies`: its tied-embedding copies, ParallelModel.tied_copies)."""
    optimizer = build_optimizer(model, cfg.optim, lr=scaled_lr(cfg, plan.full),
                                master_weights=policy.master_weights,
                                embedding_copies=embedding_copies)
    steps_per_epoch = math.ceil(n_train / plan.full)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch)
    penalty = build_penalty(decayed_params(model, cfg.optim, embedding_copies),
                            cfg.optim.l1, cfg.optim.l2)
    return Strategy(optimizer, scheduler, plan, penalty)
