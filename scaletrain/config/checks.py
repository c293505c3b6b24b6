"""Rules that involve more than one field; each failure is one line naming the fields."""

from __future__ import annotations

from scaletrain.config.batch_plan import batch_plan
from scaletrain.config.dims import ParallelDims
from scaletrain.config.dpo_checks import check_dpo
from scaletrain.config.faults_checks import check_checkpoint_config
from scaletrain.config.mixture_checks import check_sources
from scaletrain.config.model_checks import FAMILY_RULES
from scaletrain.config.ps_checks import check_ps
from scaletrain.config.schema import Config
from scaletrain.config.strategy_checks import check_training_strategy
from scaletrain.errors import ConfigError


def data_parallel_degree(cfg: Config) -> int:
    """dp_replicate × dp_shard of a config judged on its own (`build_config`, no world):
    a -1 counts as 1. With a world, the degree is the resolved `ParallelDims.dp` the
    launcher, `plan --world` and every rank hand down (parallel/world_checks.py); it
    is not re-derived here."""
    return max(cfg.parallel.dp_replicate, 1) * max(cfg.parallel.dp_shard, 1)


def accumulation_steps(cfg: Config, dims: ParallelDims | None = None) -> int:
    """Micro-batches per optimizer step on each rank (DESIGN.md §3): the batch plan's,
    the count the trainer runs and reports; `dims`: the run's resolved layout."""
    if dims is None:  # judged on its own, as data_parallel_degree does
        return batch_plan(cfg, data_parallel_degree(cfg), pp=max(cfg.parallel.pp, 1)).accum
    return batch_plan(cfg, dims.dp, pp=dims.pp).accum


def check_combinations(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    family = FAMILY_RULES[m.name]  # the registry's facts validation needs (model_checks.py)
    if family.kind == "text":
        if m.vocab_size and m.vocab_size < 2:
            raise ConfigError("model.vocab_size must be 0 (from the tokenizer) or >= 2")
        if cfg.data.source == "digits":
            raise ConfigError(f"model.name='{m.name}' needs a text data.source, not 'digits' "
                              "(use model.name='cnn' or 'mlp')")
    elif cfg.data.source != "digits":
        raise ConfigError(f"model.name='{m.name}' is an image model; set data.source='digits'")
    check_sources(cfg.data)  # a list of sources, data.mixture (config/mixture_checks.py)
    if family.check is not None:
        family.check(m)  # the family's own shape rules
    if cfg.data.document_masking and family.kind != "text":
        raise ConfigError(f"data.document_masking needs a text model, not model.name="
                          f"'{m.name}' (images have no documents)")
    if cfg.data.format == "chat" and family.kind != "text":
        raise ConfigError(f"data.format='chat' needs a text model, not model.name="
                          f"'{m.name}'")
    if cfg.data.document_masking and cfg.distill.teacher:
        raise ConfigError("data.document_masking is not supported with distill.teacher "
                          "(the teacher's logits would attend across documents)")
    check_loss_chunks(cfg, family.kind)
    check_parallel(cfg, None)  # the world's part: parallel/world_checks.py check_world
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must be < 1 "
                          "(something must be left to train on)")
    if cfg.schedule.warmup_steps > t.steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds "
                          f"train.steps={t.steps}")
    check_training_strategy(cfg, data_parallel_degree(cfg))  # schedules, batch rules
    check_checkpoint_config(cfg)  # faults
    check_dpo(cfg)  # train.objective='dpo': what preference tuning refuses


def check_loss_chunks(cfg: Config, kind: str) -> None:
    """model.loss_chunks: text models' own head + loss only (models/chunked_loss.py)."""
    n = cfg.model.loss_chunks
    if n <= 0:  # off, or auto (-1: models/loss_chunks_auto.py decides where it applies)
        return
    if kind != "text":
        raise ConfigError(f"model.loss_chunks={n} needs a text model, not model.name="
                          f"'{cfg.model.name}' (set model.loss_chunks=0)")
    if cfg.distill.teacher:
        raise ConfigError(f"model.loss_chunks={n} is not supported with distill.teacher "
                          "(the distillation loss needs the whole logits; set "
                          "model.loss_chunks=0)")
    if n > cfg.model.seq_len:
        raise ConfigError(f"model.loss_chunks={n} exceeds model.seq_len="
                          f"{cfg.model.seq_len} (a chunk is at least one position)")


def check_parallel(cfg: Config, world: int | None, dims: ParallelDims | None = None) -> None:
    """The batch against the data-parallel degree and the rules of the parallel settings.

    `dims`: the layout resolved for the world (check_world's; None: a config judged on
    its own, a -1 degree counts as 1); `world`: the world size parameter-server mode
    judges (None: not known yet)."""
    if cfg.parallel.mode == "ps":  # parameter-server mode has its own rules (issue #7)
        return check_ps(cfg, world)
    t = cfg.train
    dp = dims.dp if dims is not None else data_parallel_degree(cfg)
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
    # The plan measures, and AC wraps, the family's transformer blocks.
    if cfg.plan.auto and not FAMILY_RULES[cfg.model.name].blocks:
        raise ConfigError(f"plan.auto needs a model with transformer blocks the memory "
                          f"plan measures (a text family), not '{cfg.model.name}'")
    if p.activation_checkpoint != "none" and not FAMILY_RULES[cfg.model.name].blocks:
        with_blocks = ", ".join(repr(n) for n, f in FAMILY_RULES.items() if f.blocks)
        raise ConfigError(f"parallel.activation_checkpoint='{p.activation_checkpoint}' "
                          f"needs a model family with transformer blocks ({with_blocks}), "
                          f"not '{cfg.model.name}'")
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                          f"data-parallel degree {dp} (parallel.dp_replicate * dp_shard)")
    per_rank = t.batch_size // dp
    # (stochastic / full-batch descent ignore train.batch_size: optim/batch_rules.py)
    if t.micro_batch_size and per_rank % t.micro_batch_size and t.descent == "mini-batch":
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} * data-parallel "
                          f"degree {dp}")
