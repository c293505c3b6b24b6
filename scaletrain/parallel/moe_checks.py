"""The layouts a mixture-of-experts model (model.moe_experts > 0, models/moe.py) trains
in today, judged with the world's other rules (parallel/world_checks.py): one process,
DDP and FSDP2, with full or selective activation checkpointing (tested against one
process without it: tests/distributed/test_moe_parity.py).

Refused, one line each, until they are built and tested: tensor parallelism (the llama
TP plan shards the dense MLP, not 3-D expert weights), pipeline stages (the MoE loss
terms are collected on every stage, the pipeline step only sees the last stage's loss),
the parameter server, budget activation checkpointing (the plan's per-block bytes under
AC miss the MoE layer's statistics and over-count its expert-weight casts) and compile
(the segment loop's host read of the expert counts; untested).
Expert parallelism (parallel.ep) is issue #17's next part: it replaces models/moe.py's
`dispatch` / `combine` with all-to-all versions.
"""

from __future__ import annotations

from scaletrain.errors import ConfigError


def check_moe_layout(cfg) -> None:
    if not cfg.model.moe_experts:
        return
    p = cfg.parallel
    refused = (("parallel.mode='ps'", p.mode == "ps"), ("parallel.tp > 1", p.tp > 1),
               ("parallel.pp > 1", p.pp > 1),
               ("parallel.activation_checkpoint='budget'", p.activation_checkpoint == "budget"),
               ("train.compile", cfg.train.compile))
    for what, on in refused:
        if on:
            raise ConfigError(f"{what} is not supported with mixture-of-experts layers "
                              f"(model.moe_experts={cfg.model.moe_experts}) yet: one "
                              "process, DDP and FSDP2 (with full / selective AC) are")
