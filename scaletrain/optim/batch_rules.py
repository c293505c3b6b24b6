"""Batch-size rules: LR scaling with the global batch, batch ramp-up, descent modes.

- `optim.lr_scaling`: the peak LR is `optim.lr` at `optim.base_batch_size` and scales
  with the global batch B as (B / base) ("linear", Goyal et al. 2017, "Accurate, Large
  Minibatch SGD", §2.1) or sqrt(B / base) ("sqrt", Krizhevsky 2014; Malladi et al. 2022
  for Adam). B is the full batch of the descent mode, not a ramped one.
- `train.descent`: "mini-batch" uses `train.batch_size`; "stochastic" one sample per
  step; "full-batch" the whole train split per step (for small data sets: one epoch is
  one step, since the global sampler hands out a permutation of the split per epoch).
- `train.batch_ramp`: the global batch grows linearly from `train.batch_ramp_start` to
  the full batch over the first `batch_ramp` trained tokens (GPT-3, Brown et al. 2020,
  app. B), rounded down to a multiple of the start batch (itself a multiple of micro-batch
  × data-parallel degree, so every rank runs whole micro-batches). The sizes depend on
  the config only, not on the number of ranks, and each step draws a global batch of
  that size from the world-size-independent sampler: the samples a step sees are the
  same on any layout.
"""

from __future__ import annotations

import math

from scaletrain.config.batch_plan import BatchPlan, batch_plan, full_batch_size
from scaletrain.config.schema import Config

__all__ = ["BatchPlan", "batch_plan", "build_batch_plan", "full_batch_size", "scaled_lr"]


def scaled_lr(cfg: Config, batch: int | None = None) -> float:
    """`optim.lr` scaled from `optim.base_batch_size` to the global batch `batch`.

    `batch` defaults to `train.batch_size` (full-batch runs pass the split size)."""
    o = cfg.optim
    if o.lr_scaling == "none":
        return o.lr
    b = batch if batch is not None else (1 if cfg.train.descent == "stochastic"
                                        else cfg.train.batch_size)
    ratio = b / (o.base_batch_size or cfg.train.batch_size)
    return o.lr * (ratio if o.lr_scaling == "linear" else math.sqrt(ratio))


# The batch plan itself (computed once per run) lives in config/batch_plan.py.
build_batch_plan = batch_plan
