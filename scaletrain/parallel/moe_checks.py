"""The layouts a mixture-of-experts model (model.moe_experts > 0, models/moe.py) trains
in today, judged with the world's other rules (parallel/world_checks.py): one process,
DDP and FSDP2, with full or selective activation checkpointing (tested against one
process without it: tests/distributed/test_moe_parity.py), and pipeline stages (each
stage adds its own MoE loss terms to its backward and the statistics are summed over
every rank: parallel/pipeline_moe.py; tests/distributed/test_moe_pipeline.py).

Tensor parallelism (issue #17; models/plans.py `moe_tp_plan`): attention and dense MLPs
sharded as in a dense llama, the shared experts too; the router and the routed experts
(3-D weights) replicated over the tp ranks, which all route the same tokens — under
sequence parallel the MoE input is gathered before the router and the output cut after —
so the router statistics, the aux / z terms and the sigmoid_bias update are counted
once (the step sums them over the data-parallel ranks only; a pipeline over every rank,
each tp group's once). Tested against one process with SP, × FSDP2 (experts FSDP2-
sharded over dp, replicated over tp), × PP and with full activation checkpointing:
tests/distributed/test_moe_tp.py.
Expert parallelism with TP (EP × TP, config/dims.py): within each tp index the dp_shard
ranks form the expert mesh, the tp ranks of a group hold the same expert slice
(replicated over tp) and run the same exchange; the statistics are counted once by the
same data-parallel sum. Tested against one process with SP and capacity drops:
tests/distributed/test_moe_ep_tp.py. EP × TP × PP is refused by config/dims.py
(untested).

Refused, one line each, until they are built and tested: the parameter server, budget
activation checkpointing (the plan's per-block bytes under AC miss the MoE layer's
statistics and over-count its expert-weight casts) and train.compile with
parallel.tp > 1 (the replicated experts' local-weight forward inside a compiled block is
untested). train.compile per block (the default scope) trains MoE blocks, on one
process and with expert parallelism: the segment loop of the experts (its host read of
the counts) and the expert-parallel exchange run eagerly, graph breaks inside the
compiled block (models/moe.py `segment_matmul`, parallel/expert.py); tested against
eager in tests/distributed/test_moe_ep.py. train.compile_scope='model' stays refused:
tested against eager (10 steps, the segment loop's break as per block), fp32 losses
agree to 1.1e-7 but the fp64 parameters differ by 2.9e-8 (per block: <= 1e-10), an
inexactness of the whole-model graph not yet found (session 11).
Expert parallelism (parallel.ep, parallel/expert.py) inside FSDP2: ep must divide the
routed experts (config/dims.py checks that it divides dp_shard, and refuses two of
replicas, TP and PP at once with it; under PP the expert mesh gains a pp dimension, under
TP a tp one), and needs a model with at least one MoE layer. In HSDP replicas
(dp_replicate > 1; with dp_shard = ep the experts are replicated, not sharded, over the
replicas: EP's form of DDP) the experts' FSDP2 unit is HSDP over ("dp_replicate",
"efsdp"), so the replicate group all-reduces their gradients, and the sigmoid_bias loads
are summed over every data-parallel rank: tests/distributed/test_moe_ep_layouts.py,
which also runs EP with parallel.cpu_offload (FSDP2's CPUOffloadPolicy on the expert
units too; on CPU a code path check). Full and selective activation checkpointing
compose with it
(tests/distributed/test_moe_ep.py): the recompute runs the block's forward again, both
all-to-alls included, on every rank at the same point of the backward. The routing is a
deterministic function of the block's input (the balancing bias only moves after the
optimizer step, dropout's RNG state is restored by the checkpoint), so the recompute
sends the same rows; were it not so, the splits would still agree between peers (each
rank derives them from the counts it exchanged) and torch's checkpoint would fail on the
recomputed shapes instead of hanging.
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
    refused = (("parallel.mode='ps'", p.mode == "ps"),
               ("parallel.activation_checkpoint='budget'", p.activation_checkpoint == "budget"),
               ("train.compile_scope='model'",
                cfg.train.compile and cfg.train.compile_scope == "model"),
               ("train.compile with parallel.tp > 1", cfg.train.compile and p.tp > 1))
    for what, on in refused:
        if on:
            raise ConfigError(f"{what} is not supported with mixture-of-experts layers "
                              f"(model.moe_experts={cfg.model.moe_experts}) yet: one "
                              "process, DDP, FSDP2, TP (with SP, FSDP2, EP, PP) and pipeline "
                              "stages (with full / selective AC, and train.compile per "
                              "block without TP) are")


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
    if m.moe_experts % ep:
        raise ConfigError(f"parallel.ep={ep} must divide model.moe_experts="
                          f"{m.moe_experts} (each expert-parallel rank holds "
                          "moe_experts / ep experts)")
