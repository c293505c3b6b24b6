"""Rules that involve more than one field; each failure is one line naming the fields."""

from __future__ import annotations

import os

from scaletrain.config.batch_plan import batch_plan
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError
from scaletrain.parallel.dims import resolve_dims


def _env_world() -> int | None:
    """WORLD_SIZE of this process when launched by torchrun; None before the launch."""
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w else None


def data_parallel_degree(cfg: Config, world: int | None = None) -> int:
    """dp_replicate × dp_shard, with a -1 inferred from `world` (default: $WORLD_SIZE).

    Before a launch (no world known yet) a -1 counts as 1; the launcher and every rank
    check again with the real world size (parallel/dims.py).
    """
    world = world or _env_world()
    if world is None:
        return max(cfg.parallel.dp_replicate, 1) * max(cfg.parallel.dp_shard, 1)
    return resolve_dims(cfg.parallel, world).dp


def accumulation_steps(cfg: Config, world: int | None = None) -> int:
    """Micro-batches per optimizer step on each rank (DESIGN.md §3): the batch plan's,
    the count the trainer runs and reports."""
    return batch_plan(cfg, data_parallel_degree(cfg, world)).accum


def check_combinations(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    from scaletrain.models.registry import spec_of  # models import config: no cycle

    spec = spec_of(m)
    if spec.kind == "text":
        if m.vocab_size and m.vocab_size < 2:
            raise ConfigError(f"model.vocab_size must be 0 (from the tokenizer) or >= 2")
        if cfg.data.source == "digits":
            raise ConfigError(f"model.name='{m.name}' needs a text data.source, not 'digits' "
                              "(use model.name='cnn' or 'mlp')")
    elif cfg.data.source != "digits":
        raise ConfigError(f"model.name='{m.name}' is an image model; set data.source='digits'")
    if spec.check is not None:
        spec.check(m)  # the family's own shape rules
    check_parallel(cfg, _env_world())
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must be < 1 "
                          "(something must be left to train on)")
    if cfg.schedule.warmup_steps > t.steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds "
                          f"train.steps={t.steps}")
    from scaletrain.optim.checks import check_training_strategy  # schedules, batch rules

    check_training_strategy(cfg)
    from scaletrain.checkpoint.checks import check_checkpoint_config  # resume, faults

    check_checkpoint_config(cfg)


def check_parallel(cfg: Config, world: int | None) -> None:
    """Parallel degrees against the world size (when known) and the batch against dp."""
    if cfg.parallel.mode == "ps":  # parameter-server mode has its own rules (issue #7)
        from scaletrain.paramserver.checks import check_ps

        return check_ps(cfg, world)
    t = cfg.train
    dp = data_parallel_degree(cfg, world)  # ConfigError naming the degrees if they clash
    p = cfg.parallel
    if p.activation_checkpoint == "budget" and p.activation_budget_gib <= 0:
        raise ConfigError("parallel.activation_checkpoint='budget' needs "
                          "parallel.activation_budget_gib > 0")
    if p.activation_budget_gib > 0 and p.activation_checkpoint != "budget":
        raise ConfigError("parallel.activation_budget_gib is read only with "
                          "parallel.activation_checkpoint='budget'")
    if p.activation_checkpoint_every > 1 and p.activation_checkpoint not in ("full",
                                                                            "selective"):
        raise ConfigError("parallel.activation_checkpoint_every > 1 needs "
                          "parallel.activation_checkpoint='full' or 'selective'")
    from scaletrain.models.registry import spec_of  # models import config: no cycle

    # The plan measures, and AC wraps, the family's transformer blocks (ModelSpec).
    has_blocks = spec_of(cfg.model).activation_block is not None
    if cfg.plan.auto and not has_blocks:
        raise ConfigError(f"plan.auto needs a model with transformer blocks the memory "
                          f"plan measures (a text family), not '{cfg.model.name}'")
    if cfg.parallel.activation_checkpoint != "none" and not has_blocks:
        raise ConfigError(f"parallel.activation_checkpoint="
                          f"'{cfg.parallel.activation_checkpoint}' needs a model with "
                          f"transformer blocks (a text family), not '{cfg.model.name}'")
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                          f"data-parallel degree {dp} (parallel.dp_replicate * dp_shard)")
    per_rank = t.batch_size // dp
    # (stochastic / full-batch descent ignore train.batch_size: optim/batch_rules.py)
    if t.micro_batch_size and per_rank % t.micro_batch_size and t.descent == "mini-batch":
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} * data-parallel "
                          f"degree {dp}")
