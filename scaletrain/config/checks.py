"""Rules that involve more than one field; each failure is one line naming the fields."""

from __future__ import annotations

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError


def data_parallel_degree(cfg: Config) -> int:
    return cfg.parallel.dp_replicate * cfg.parallel.dp_shard


def accumulation_steps(cfg: Config) -> int:
    """Micro-batches per optimizer step on each rank (DESIGN.md §3)."""
    dp = data_parallel_degree(cfg)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size // dp
    return cfg.train.batch_size // (micro * dp)


def check_combinations(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    if m.name == "gpt":
        if m.d_model % m.n_head:
            raise ConfigError(f"model.n_head={m.n_head} must divide model.d_model={m.d_model}")
        if m.vocab_size and m.vocab_size < 2:
            raise ConfigError(f"model.vocab_size must be 0 (from the tokenizer) or >= 2")
        if cfg.data.source == "digits":
            raise ConfigError("model.name='gpt' needs a text data.source, not 'digits' "
                              "(use model.name='cnn' or 'mlp')")
    elif cfg.data.source != "digits":
        raise ConfigError(f"model.name='{m.name}' is an image model; set data.source='digits'")
    dp = data_parallel_degree(cfg)
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                          f"data-parallel degree {dp} (parallel.dp_replicate * dp_shard)")
    per_rank = t.batch_size // dp
    if t.micro_batch_size and per_rank % t.micro_batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} * data-parallel "
                          f"degree {dp}")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must be < 1 "
                          "(something must be left to train on)")
    if cfg.schedule.warmup_steps > t.steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds "
                          f"train.steps={t.steps}")
