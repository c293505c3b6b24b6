"""Everything about a config that depends on the world size, judged by one function.

`check_world(cfg, world, vocab)` is what the `--nproc N` launcher runs before it starts
torchrun (one line, exit 2, instead of the same line from N ranks and torchrun's
report), what `scaletrain plan --world N` runs before it prints a layout (so plan never
shows a layout that train refuses), and what every rank runs once the real vocabulary
is known (train/trainer.py). The world size is passed in, never read from the
environment (DESIGN.md §6: resolve once, pass down).
"""

from __future__ import annotations

from scaletrain.config.checks import check_parallel
from scaletrain.errors import ConfigError
from scaletrain.parallel.model_parallel import check_model_parallel


def check_world(cfg, world: int, vocab: int | None = None) -> None:
    """ConfigError (one line) if `cfg` cannot run on `world` ranks.

    `vocab`: the vocabulary the TP split must divide; None when it is not known yet
    (before the data is prepared: the ranks check it again with the tokenizer's).
    """
    if world < 1:
        raise ConfigError(f"the world size must be at least 1 process, got {world}")
    check_parallel(cfg, world)  # degrees, batch vs data-parallel degree (and PS rules)
    if cfg.parallel.mode == "ps":
        return  # no TP/PP/FSDP in PS mode; check_ps judged the world
    if world > 1:
        if cfg.train.compile and cfg.train.compile_scope == "model":
            raise ConfigError("train.compile_scope='model' needs one process: FSDP/DDP "
                              "hooks and pipeline stages need the block boundaries; use "
                              "'blocks'")
        f = cfg.finetune
        if f.lora_rank or f.freeze:
            # The converters run after DDP / FSDP wrapped the model, whose gradient hooks
            # and buckets would not know about the new or frozen parameters.
            raise ConfigError(f"finetune.lora_rank / finetune.freeze run in a single "
                              f"process only, not {world} (drop --nproc)")
    check_model_parallel(cfg, vocab, world)
