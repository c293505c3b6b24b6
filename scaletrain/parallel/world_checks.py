"""Everything about a config that depends on the world size, judged by one function.

`check_world(cfg, world, vocab)` is what the `--nproc N` launcher runs before it starts
torchrun (one line, exit 2, instead of the same line from N ranks and torchrun's
report), what `scaletrain plan --world N` runs before it prints a layout (so plan never
shows a layout that train refuses), and what every rank runs once the real vocabulary
is known (train/trainer.py). The world size is passed in, never read from the
environment (parallel/world.py), and the layout it resolves is returned to be handed on
(DESIGN.md §6: resolve once, pass down).
"""

from __future__ import annotations

from scaletrain.config.checks import check_parallel
from scaletrain.config.dims import ParallelDims, resolve_dims
from scaletrain.config.strategy_checks import check_training_strategy
from scaletrain.errors import ConfigError
from scaletrain.parallel.model_parallel import check_model_parallel
from scaletrain.parallel.moe_checks import check_moe_layout


def check_world(cfg, world: int, vocab: int | None = None,
                dims: ParallelDims | None = None) -> ParallelDims | None:
    """ConfigError (one line) if `cfg` cannot run on `world` ranks; else its layout.

    `vocab`: the vocabulary the TP split must divide; None when it is not known yet
    (before the data is prepared: the ranks check it again with the tokenizer's).
    `dims`: the layout the caller's run build resolved (the trainer's); without it the
    layout is resolved here, once, and returned for the caller to hand on (the launcher's
    memory check, `plan --world`). None in parameter-server mode, which has no layout.
    """
    if world < 1:
        raise ConfigError(f"the world size must be at least 1 process, got {world}")
    check_moe_layout(cfg)  # the layouts MoE layers train in (parallel/moe_checks.py)
    if cfg.parallel.mode == "ps":
        check_parallel(cfg, world)  # no TP/PP/FSDP in PS mode: check_ps judges the world
        return None
    if dims is None:
        dims = resolve_dims(cfg.parallel, world)  # ConfigError naming the degrees
    check_parallel(cfg, world, dims)  # degrees, batch vs data-parallel degree
    check_training_strategy(cfg, dims.dp)  # the batch rules that depend on dp
    if world > 1:
        if cfg.train.compile and cfg.train.compile_scope == "model":
            raise ConfigError("train.compile_scope='model' needs one process: FSDP/DDP "
                              "hooks and pipeline stages need the block boundaries; use "
                              "'blocks'")
        f = cfg.finetune
        if (f.lora_rank or f.freeze) and (dims.tp > 1 or dims.pp > 1 or dims.ep > 1):
            # The converters run on the meta model before any parallelism (parallel/
            # parallelize.py `build_parallel_model(convert=)`), so DDP and FSDP2 / HSDP
            # take the adapters and the frozen flags like any parameter. TP's plans name
            # plain nn.Linear layers (a LoRA layer is not one), the pipeline reduces its
            # stages' gradients itself, and expert parallelism is untested with them.
            raise ConfigError(f"finetune.lora_rank / finetune.freeze run on one process, "
                              f"with DDP or FSDP2, not TP / PP / EP (here tp={dims.tp}, "
                              f"pp={dims.pp}, ep={dims.ep}); set parallel.tp=1 "
                              f"parallel.pp=1 parallel.ep=1")
    check_model_parallel(cfg, vocab, dims)
    return dims
