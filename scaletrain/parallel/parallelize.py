"""Compose the parallel techniques in one fixed order (DESIGN.md principle 2).

    build on meta -> [PP: prune to stage] -> EP -> TP -> activation checkpointing
                  -> [compile] -> FSDP2 / HSDP | DDP -> materialise + seeded init

Why this order (torchtitan `parallelize_llama`): TP changes the parameters into
DTensors that FSDP then shards on top; AC wraps the blocks' computation and must sit
inside FSDP's per-block unit so recomputation re-gathers the block's parameters;
FSDP/DDP come last because they own the parameters and the gradient hooks. Weights are
initialised *after* sharding, from generators seeded per parameter name
(models/gpt.py `init_weights`), so every layout starts from bitwise the same values and
no rank ever holds the full unsharded model. EP (parallel/expert.py) sits beside TP, just
before it: it turns the expert weights into DTensors over the "ep" ranks (replicated
over "tp" under TP), which FSDP2 then shards again over the "efsdp" ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from scaletrain.config.dims import ParallelDims
from scaletrain.errors import ConfigError
from scaletrain.models.contract import tied_copies
from scaletrain.models.registry import materialize, spec_of
from scaletrain.parallel.ac import ACPolicy, apply_ac
from scaletrain.parallel.compile import apply_compile
from scaletrain.parallel.ddp import apply_ddp
from scaletrain.parallel.expert import apply_ep
from scaletrain.parallel.fsdp import apply_fsdp
from scaletrain.parallel.model_parallel import (holds_last_stage, make_stage_views,
                                                maybe_apply_tp, prune_for_rank)
from scaletrain.parallel.parallel_model import ParallelModel
from scaletrain.parallel.tensor import fsdp_shard_placement
from scaletrain.precision import PrecisionPolicy


def fsdp_mesh(mesh, dims: ParallelDims):
    """The mesh FSDP shards over: ('dp_replicate', 'dp_shard') for HSDP, else 1-D."""
    return mesh["dp_replicate", "dp_shard"] if dims.hsdp else mesh["dp_shard"]


def expert_fsdp_mesh(expert_mesh, dims: ParallelDims):
    """The mesh the expert-parallel experts are FSDP2-sharded over (None without EP):
    ("dp_replicate", "efsdp") for HSDP replicas, else "efsdp" (config/dims.py)."""
    if dims.ep == 1:
        return None
    return expert_mesh["dp_replicate", "efsdp"] if dims.hsdp else expert_mesh["efsdp"]


def parallelize(model: nn.Module, dims: ParallelDims, mesh, pcfg,
                policy: PrecisionPolicy, device: torch.device, tp_plan=None,
                compile: bool | str = False, stage_views=None, ac=None,
                tied=(), expert_mesh=None) -> nn.Module:
    """Apply TP, AC, compile and FSDP/HSDP or DDP to `model` in place, per `pcfg`.

    With pp > 1 `model` is this rank's pipeline stage(s) (parallel/model_parallel.py);
    `stage_views`: its per-stage modules (interleaved schedule), FSDP's roots.
    `compile`: False, True / "blocks" (per block) or "model" (whole forward, one process).
    `ac`: the `ACPolicy` (plan/memory.py `ac_policy`; needed for budget mode); default
    from `pcfg`. `tied`: the family's tied pairs, re-tied after TP (ModelSpec.tied).
    `expert_mesh`: the expert mesh when dims.ep > 1 (DistContext.expert_mesh; config/
    dims.py `expert_mesh_shape`: ([pp,] [dp_replicate,] "efsdp", "ep"[, "tp"])).
    """
    # EP before TP: the TP plan then leaves the expert-parallel experts (already
    # DTensors over ("ep"[, "tp"])) alone; both before FSDP, which shards their DTensors.
    if dims.ep > 1:  # experts as DTensors over "ep" (config/dims.py: ep needs FSDP2)
        apply_ep(model, expert_mesh)
    maybe_apply_tp(model, dims, mesh, pcfg, tp_plan, tied)
    if ac is None:
        if pcfg.activation_checkpoint == "budget":
            raise ValueError("budget activation checkpointing needs an ACPolicy "
                             "(plan/memory.py ac_policy)")
        ac = ACPolicy(pcfg.activation_checkpoint, pcfg.activation_checkpoint_every)
    apply_ac(model, ac)
    if compile == "model" and dims.world > 1:
        raise ConfigError("train.compile_scope='model' needs one process: FSDP/DDP hooks "
                          "and pipeline stages need the block boundaries; use 'blocks'")
    if compile:  # per block, on the checkpointed forward, inside FSDP's unit
        apply_compile(model, "model" if compile == "model" else "blocks")
    if dims.fsdp:
        # Mixed precision under FSDP: keep fp32 master shards, gather and compute in
        # bf16, reduce gradients in fp32 (torchtitan's default). bf16-pure already has
        # bf16 parameters; its gradients are still summed in fp32.
        param_dtype = torch.bfloat16 if policy.name == "bf16" else None
        reduce_dtype = torch.float32 if policy.name in ("bf16", "bf16-pure") else None
        apply_fsdp(model, fsdp_mesh(mesh, dims), param_dtype=param_dtype,
                   reduce_dtype=reduce_dtype, device=device,
                   reshard_after_forward=pcfg.reshard_after_forward,
                   cpu_offload=pcfg.cpu_offload,
                   shard_placement_fn=fsdp_shard_placement if dims.tp > 1 else None,
                   roots=stage_views, expert_shard_mesh=expert_fsdp_mesh(expert_mesh, dims))
    elif dims.ddp and dims.pp == 1:
        # Under a pipeline the schedule runs each micro-batch's backward itself (with DDP
        # hooks only for the `DistributedDataParallel` class, torch pipelining stage.py),
        # so the stages stay plain and the pipeline all-reduces their gradients once per
        # step (parallel/pipeline_step.py `Pipeline.step`).
        apply_ddp(model, mesh["dp_replicate"], bucket_cap_mb=pcfg.ddp_bucket_mb)
    return model


def build_parallel_model(mcfg, facts: dict, *, seed: int, dims: ParallelDims, mesh, pcfg,
                         policy: PrecisionPolicy, device: torch.device,
                         compile: bool | str = False, ac=None,
                         init: bool = True, expert_mesh=None,
                         convert: Callable[[nn.Module], nn.Module] | None = None
                         ) -> ParallelModel:
    """Build `mcfg`'s model on meta, parallelise it, then allocate and initialise it
    (`init=False`: not its parameters, which a loader writes next; models/registry.py
    `materialize`).

    Returns the module with its layout facts (stage views, tied copies, loss-parallel
    logits). With one process this gives exactly `models.build_model`'s weights.
    `expert_mesh`: DistContext.expert_mesh (expert parallelism), else None.
    `convert`: a module conversion run on the meta model before any parallelism (the
    freeze / LoRA converters, finetune/init_from.py `converter`): the parameters it adds
    or freezes are then the ones FSDP2 shards and reduces. TP's plan names plain
    linears, so a converted model is not given TP (parallel/world_checks.py).
    """
    spec = spec_of(mcfg)
    with torch.device("meta"):
        model = spec.build(mcfg, facts)
    views, last = None, True
    if dims.pp > 1:  # keep only this rank's pipeline stage(s)
        prune_for_rank(model, spec.pipeline, pcfg, mesh)
        n_layer = spec.pipeline.depth(mcfg)
        views = make_stage_views(model, spec.pipeline, n_layer, pcfg, mesh)
        last = holds_last_stage(n_layer, pcfg, mesh)
    model.to(dtype=policy.param_dtype)  # on meta: sets dtypes, allocates nothing
    if convert is not None:  # adapters in the parameter dtype, before FSDP takes them
        model = convert(model)
    parallelize(model, dims, mesh, pcfg, policy, device, tp_plan=spec.tp_plan, compile=compile,
                stage_views=views, ac=ac, tied=spec.tied, expert_mesh=expert_mesh)
    # With CPU offload, FSDP keeps the sharded parameters in host memory.
    init_device = torch.device("cpu") if dims.fsdp and pcfg.cpu_offload else device
    materialize(model, init_device, seed, tied=spec.tied, init=init)
    # A last stage's head whose embedding lives on the first stage is a copy of it.
    copies = tied_copies(model, spec.tied) if dims.pp > 1 else {}
    return ParallelModel(model, spec, stage_views=views,
                         tp_loss_parallel=dims.tp > 1 and bool(pcfg.loss_parallel) and last,
                         tied_copies=copies)
