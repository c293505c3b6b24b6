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
from dataclasses import dataclass

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError


def full_batch_size(cfg: Config, n_train: int | None = None) -> int:
    """The global batch of one step once any ramp is over (samples)."""
    mode = cfg.train.descent
    if mode == "stochastic":
        return 1
    if mode == "full-batch":
        if n_train is None:
            raise ValueError("full-batch descent needs the size of the train split")
        return n_train
    return cfg.train.batch_size


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


@dataclass
class BatchPlan:
    """Global batch and micro-batch size of every step."""

    full: int  # global batch after the ramp
    micro: int  # samples per forward on one rank
    dp: int
    ramp_start: int = 0  # 0: no ramp
    ramp_tokens: int = 0

    def batch_size(self, tokens_seen: int) -> int:
        """Global batch of the step that follows `tokens_seen` trained tokens."""
        if not self.ramp_tokens or tokens_seen >= self.ramp_tokens:
            return self.full
        # Integer arithmetic: the same batch sizes on every machine.
        b = self.ramp_start + (self.full - self.ramp_start) * tokens_seen // self.ramp_tokens
        return min(self.full, b // self.ramp_start * self.ramp_start)


def build_batch_plan(cfg: Config, n_train: int, dp: int) -> BatchPlan:
    """The batch plan of `cfg` for a train split of `n_train` samples over `dp` ranks."""
    t = cfg.train
    full = full_batch_size(cfg, n_train)
    if full % dp:
        raise ConfigError(f"train.descent='{t.descent}': the global batch of {full} samples "
                          f"does not divide over the data-parallel degree {dp}")
    per_rank = full // dp
    # A micro-batch that does not divide a full-batch split leaves a smaller last one;
    # the step normalises by the global target count, so that is still exact.
    micro = min(t.micro_batch_size, per_rank) if t.micro_batch_size else per_rank
    if t.batch_ramp and t.batch_ramp_start > full:
        raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} exceeds the "
                          f"global batch {full}")
    return BatchPlan(full=full, micro=micro, dp=dp, ramp_start=t.batch_ramp_start,
                     ramp_tokens=t.batch_ramp)
