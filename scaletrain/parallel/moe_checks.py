"""The layouts a mixture-of-experts model (model.moe_experts > 0, models/moe.py) trains
in today, judged with the world's other rules (parallel/world_checks.py): one process,
DDP and FSDP2, with full or selective activation checkpointing (tested against one
process without it: tests/distributed/test_moe_parity.py), and pipeline stages (each
stage adds its own MoE loss terms to its backward and the statistics are summed over
every rank: parallel/pipeline_moe.py; tests/distributed/test_moe_pipeline.py).

Refused, one line each, until they are built and tested: tensor parallelism (the llama
TP plan shards the dense MLP, not 3-D expert weights), the parameter server, budget
activation checkpointing (the plan's per-block bytes under
AC miss the MoE layer's statistics and over-count its expert-weight casts) and compile
(the segment loop's host read of the expert counts; untested).
Expert parallelism (parallel.ep, parallel/expert.py) inside FSDP2: ep must divide the
routed experts (config/dims.py checks that it divides dp_shard and refuses HSDP / DDP /
TP / PP with it), and needs a model with at least one MoE layer; activation
checkpointing and CPU offload with it are refused until they are tested.
"""

from __future__ import annotations

from scaletrain.config.model_checks import is_moe_layer
from scaletrain.errors import ConfigError


def check_moe_layout(cfg) -> None:
    """ConfigError (one line) for a layout the model's MoE layers (or their absence,
    with parallel.ep > 1) do not train in."""
    check_expert_parallel(cfg)
    if not cfg.model.moe_experts:
        return
    p = cfg.parallel
    refused = (("parallel.mode='ps'", p.mode == "ps"), ("parallel.tp > 1", p.tp > 1),
               ("parallel.activation_checkpoint='budget'", p.activation_checkpoint == "budget"),
               ("train.compile", cfg.train.compile))
    for what, on in refused:
        if on:
            raise ConfigError(f"{what} is not supported with mixture-of-experts layers "
                              f"(model.moe_experts={cfg.model.moe_experts}) yet: one "
                              "process, DDP and FSDP2 (with full / selective AC) are")


def check_expert_parallel(cfg) -> None:
    """parallel.ep against the model: a MoE layer to split, experts it divides."""
    m, ep = cfg.model, cfg.parallel.ep
    if ep == 1:
        return
    if cfg.parallel.mode == "ps":
        raise ConfigError(f"parallel.ep={ep} is not supported in parameter-server mode "
                          "(parallel.mode='ps')")
    n_layer = getattr(m, "n_layer", 0) or 0
    if not any(is_moe_layer(i, m.moe_experts, m.moe_every, m.moe_first_dense)
               for i in range(n_layer)):
        raise ConfigError(f"parallel.ep={ep} needs a mixture-of-experts model, but "
                          f"model.name={m.name!r} with model.moe_experts={m.moe_experts} "
                          "has no MoE layer (set model.moe_experts, or parallel.ep=1)")
    p = cfg.parallel
    for what, on in (("parallel.activation_checkpoint=" + repr(p.activation_checkpoint),
                      p.activation_checkpoint != "none"),
                     ("parallel.cpu_offload", p.cpu_offload)):
        if on:  # the recompute / offload of the exchanging experts is not tested yet
            raise ConfigError(f"parallel.ep={ep} with {what} is not supported yet "
                              "(expert parallelism runs without activation checkpointing "
                              "and CPU offload for now)")
    if m.moe_experts % ep:
        raise ConfigError(f"parallel.ep={ep} must divide model.moe_experts="
                          f"{m.moe_experts} (each expert-parallel rank holds "
                          "moe_experts / ep experts)")
