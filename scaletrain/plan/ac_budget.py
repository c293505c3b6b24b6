"""The run's activation-checkpointing policy for its layout: budget mode is sized per
block by the plan's byte model (plan/memory.py `ac_policy`), so it lives above both
parallel/ac.py (the mechanism) and the memory model, and the trainer asks it here."""

from __future__ import annotations

from scaletrain.config.batch_plan import BatchPlan
from scaletrain.config.dims import ParallelDims
from scaletrain.errors import ConfigError
from scaletrain.models.registry import spec_of
from scaletrain.parallel.ac import ACPolicy, BudgetTooSmall, block_modes
from scaletrain.plan.memory import ac_policy


def activation_policy(cfg, dims: ParallelDims, batch: BatchPlan) -> ACPolicy:
    """`cfg`'s activation checkpointing for this layout (budget mode: sized per block by
    the plan's byte model at the micro-batch the step runs, `batch.micro`: the run's
    batch plan, which the trainer resolved once); ConfigError if the budget is below what
    checkpointing every block keeps."""
    policy = ac_policy(cfg, dims.tp, batch.micro)
    split = spec_of(cfg.model).pipeline  # families with blocks split into stages
    n_local = -(-split.depth(cfg.model) // dims.pp) if split is not None else 0
    try:
        block_modes(policy, n_local)
    except BudgetTooSmall as e:
        raise ConfigError(f"parallel.activation_budget_gib: {e}; raise it or lower "
                          f"train.micro_batch_size") from None
    return policy
