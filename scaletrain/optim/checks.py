"""Cross-field rules of the training-strategy settings (schedule, batch rules, precision,
regularisation); called from config/checks.py so they run before any compute."""

from __future__ import annotations

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError


def check_training_strategy(cfg: Config, dp: int | None = None) -> None:
    """Raise ConfigError (one line naming the fields) on a bad combination.

    `dp`: the data-parallel degree of the resolved layout (the world checks pass it);
    None for a config judged without a world, where a -1 degree counts as 1."""
    from scaletrain.config.checks import data_parallel_degree

    if dp is None:
        dp = data_parallel_degree(cfg)
    s, t, o = cfg.schedule, cfg.train, cfg.optim
    if s.name == "multistep" and not s.milestones:
        raise ConfigError("schedule.milestones must list at least one step for "
                          "schedule.name='multistep'")
    if any(m < 1 for m in s.milestones) or len(set(s.milestones)) != len(s.milestones):
        raise ConfigError(f"schedule.milestones={s.milestones} must be distinct steps >= 1")
    if s.name == "inverse_time" and s.decay_rate <= 0:
        raise ConfigError("schedule.decay_rate (k in lr/(1+k*t)) must be > 0 for "
                          "schedule.name='inverse_time'")
    if s.name == "onecycle" and s.warmup_steps:
        raise ConfigError("schedule.warmup_steps must be 0 for schedule.name='onecycle' "
                          "(its rise is schedule.pct_start of the cycle)")
    if s.name == "onecycle" and s.pct_start * (s.decay_steps or t.steps) < 2:
        raise ConfigError("schedule.pct_start * steps must be >= 2 for 'onecycle' "
                          "(OneCycleLR needs a rising phase of at least two steps)")
    if s.name in ("plateau",) and cfg.eval.interval == 0:
        raise ConfigError("schedule.name='plateau' needs eval.interval > 0 (it reduces "
                          "the LR from validation losses)")
    if o.implementation == "fused" and o.name == "rmsprop":
        raise ConfigError("optim.implementation='fused': torch has no fused rmsprop; use "
                          "'foreach'")
    if o.name == "adamw8bit" and cfg.parallel.tp > 1:
        # Its quantisation blocks run along rows, which tensor parallelism splits.
        raise ConfigError("optim.name='adamw8bit' does not support parallel.tp > 1 yet "
                          "(use data parallelism / FSDP, or optim.name='adamw')")
    if s.min_lr > o.lr and s.name != "constant":
        raise ConfigError(f"schedule.min_lr={s.min_lr} exceeds optim.lr={o.lr}")
    if o.lr_scaling != "none" and t.descent == "full-batch" and not o.base_batch_size:
        raise ConfigError("optim.lr_scaling with train.descent='full-batch' needs "
                          "optim.base_batch_size (the batch at which optim.lr holds)")
    if t.descent == "stochastic" and dp > 1:
        raise ConfigError("train.descent='stochastic' (batch 1) cannot run data-parallel")
    if cfg.model.weight_norm and (dp > 1 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        raise ConfigError("model.weight_norm is not supported with parallel layouts yet "
                          "(parallel.* must all be 1)")
    if cfg.parallel.pp > 1 and (o.l1 or o.l2 or t.batch_ramp or t.descent != "mini-batch"):
        # The pipeline step (parallel/pipeline_step.py) has a fixed micro-batch count and
        # no penalty hook yet.
        raise ConfigError("optim.l1/l2, train.batch_ramp and train.descent other than "
                          "'mini-batch' are not supported with parallel.pp > 1 yet")
    if t.batch_ramp:
        if not t.micro_batch_size:
            raise ConfigError("train.batch_ramp needs train.micro_batch_size > 0 (the "
                              "batch grows in whole micro-batches)")
        unit = t.micro_batch_size * dp
        if not t.batch_ramp_start or t.batch_ramp_start % unit:
            raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} must be a "
                              f"positive multiple of micro_batch_size x data-parallel "
                              f"degree ({unit})")
        if t.descent == "mini-batch" and t.batch_ramp_start > t.batch_size:
            raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} exceeds "
                              f"train.batch_size={t.batch_size}")
        if cfg.data.loader_workers:
            raise ConfigError("train.batch_ramp needs data.loader_workers=0 (prefetched "
                              "batches would have the old size)")
