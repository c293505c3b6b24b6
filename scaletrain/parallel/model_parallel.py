"""Hooks that plug tensor and pipeline parallelism (issue #6) into the composition of
parallel/parallelize.py, the step (train/step.py) and the trainer.

    build on meta -> prune to this rank's pipeline stage(s) [-> one view per stage]
                  -> TP -> AC -> FSDP (a root per stage view) | DDP (not under PP: the
                  pipeline all-reduces) -> materialise + seeded init
                  -> Pipeline (schedule) when pp > 1

What the model looks like to these hooks is its family's contract (models/contract.py):
the blocks in `model.blocks`, the modules of the first and last stage and the tied
pairs come from the `ModelSpec`; the facts a build produces (stage views, tied copies,
loss-parallel logits) travel in the `ParallelModel` it returns.
"""

from __future__ import annotations

import torch.nn as nn

from scaletrain.config.batch_plan import batch_plan, pipeline_microbatches
from scaletrain.errors import ConfigError
from scaletrain.models.registry import REGISTRY, count_params, spec_of
from scaletrain.parallel import meshes
from scaletrain.parallel.pipeline import (check_pp, prune_to_stage, split_bounds, stage_ids,
                                          stages_per_rank)
from scaletrain.parallel.pipeline_step import Pipeline, stage_view
from scaletrain.parallel.tensor import apply_tp, check_tp, parallel_grad_norm


def pipeline_layout(n_layer: int, pcfg, pp_rank: int):
    """(bounds of every stage, this rank's stage ids, n_stages)."""
    v = stages_per_rank(pcfg)
    bounds = split_bounds(n_layer, pcfg.pp * v, pcfg.pp_split_points)
    return bounds, stage_ids(pp_rank, pcfg.pp, v), len(bounds)


def prune_for_rank(model: nn.Module, split, pcfg, mesh) -> nn.Module:
    """Keep only the blocks (and ends) of the stages this pipeline rank runs
    (`split`: the family's PipelineSplit)."""
    bounds, ids, n = pipeline_layout(len(model.blocks), pcfg, meshes.coordinate(mesh, "pp"))
    keep = {i for s in ids for i in range(*bounds[s])}
    for name in list(model.blocks.keys()):
        if int(name) not in keep:
            del model.blocks[name]
    return prune_to_stage(model, split, (0, bounds[-1][1]), 0 in ids, n - 1 in ids)


def holds_last_stage(n_layer: int, pcfg, mesh) -> bool:
    """This pipeline rank runs the last stage (the one producing the logits)."""
    _, ids, n = pipeline_layout(n_layer, pcfg, meshes.coordinate(mesh, "pp"))
    return n - 1 in ids


def make_stage_views(model: nn.Module, split, n_layer: int, pcfg,
                     mesh) -> tuple[nn.Module, ...] | None:
    """With several stages on this rank (interleaved schedule): one module per stage
    sharing the pruned model's blocks (pipeline_step.stage_view), handed to the Pipeline
    in the ParallelModel; made before FSDP, which shards each as its own root — torch
    pipelining reduces a stage's gradients through the FSDP state of the stage's module
    (stage.py `perform_reduce_grad`), as torchtitan's model parts do. None with one
    stage per rank (the model is the stage)."""
    bounds, ids, n = pipeline_layout(n_layer, pcfg, meshes.coordinate(mesh, "pp"))
    if len(ids) == 1:
        return None
    return tuple(stage_view(model, split, bounds[s], s == 0, s == n - 1) for s in ids)


def maybe_apply_tp(model: nn.Module, dims, mesh, pcfg, tp_plan, tied=()) -> nn.Module:
    """TP over the mesh's 'tp' dimension when parallel.tp > 1 (first in the order)."""
    if dims.tp <= 1:
        return model
    if tp_plan is None:
        raise ConfigError(f"parallel.tp={dims.tp}: this model family has no tensor-"
                          "parallel plan (models/plans.py)")
    return apply_tp(model, mesh["tp"], tp_plan, loss_parallel=pcfg.loss_parallel,
                    sequence_parallel=pcfg.sequence_parallel, tied=tied)


def model_parallel_step_options(ctx, model: nn.Module, no_sync) -> dict:
    """StepOptions for a TP and/or PP layout (DistContext.step_options); TP's
    loss-parallel is the loss's own (train/step_loss.py)."""
    dims = ctx.dims
    opts = {"count_reducer": ctx.sum_reducer, "loss_multiplier": float(dims.dp),
            "clip_norm": lambda params, clip: parallel_grad_norm(params, clip, None)}
    if dims.dp > 1:
        opts["no_sync"] = lambda: no_sync(model)
    return opts


def example_io(mcfg, vocab_size: int, micro_batch: int, dtype, width: int) -> dict:
    """Meta tensors of a stage's inputs/outputs (PipelineStage static shapes);
    `width`: features of the hidden state between stages (PipelineSplit.width)."""
    import torch

    mb, T, D = micro_batch, mcfg.seq_len, width
    meta = torch.device("meta")
    return {"tokens": torch.empty(mb, T, dtype=torch.int64, device=meta),
            # requires_grad: a stage sends the gradient of its hidden-state input back
            "hidden": torch.empty(mb, T, D, dtype=dtype, device=meta, requires_grad=True),
            "logits": torch.empty(mb, T, vocab_size, dtype=dtype, device=meta,
                                  requires_grad=True),
            "static": True}


def build_pipeline(pm, ctx, pcfg, per_rank_batch: int, micro: int,
                   mcfg, vocab_size: int, dtype, step_loss, moe=None):
    """The `Pipeline` (schedule over this rank's stages) for a pruned, materialised
    model (`pm`: the ParallelModel); None when parallel.pp = 1. `step_loss`: the run's
    loss (train/step_loss.py), which the last stage computes; `moe`: the MoE step terms
    (parallel/pipeline_moe.py `pipeline_moe_terms`), which every stage adds to its own
    backward, or None."""
    if ctx.dims.pp <= 1:
        return None

    split = pm.spec.pipeline
    n_layer = split.depth(mcfg)
    m = pipeline_microbatches(pcfg, per_rank_batch, micro)
    check_pp(pcfg, n_layer, m)
    bounds, ids, _ = pipeline_layout(n_layer, pcfg, meshes.coordinate(ctx.mesh, "pp"))
    return Pipeline(pm, bounds, ids, pcfg=pcfg, microbatches=m, mesh=ctx.mesh,
                    pp_group=meshes.group(meshes.sub(ctx.mesh, "pp")), device=ctx.device,
                    step_loss=step_loss,
                    io=example_io(mcfg, vocab_size, per_rank_batch // m, dtype,
                                  split.width(mcfg)),
                    loss_multiplier=float(ctx.dims.dp),
                    ddp_group=ctx.dp_group if ctx.dims.ddp else None, moe=moe)


def whole_model_stats(pipeline, spec, mcfg, facts: dict) -> tuple[int, float | None]:
    """(parameters, training FLOPs per token) of the whole model for a pipeline rank,
    whose module holds only its stages (summary.json's `params`, the MFU's numerator).

    Parameters: the sum over the pipeline ranks of each one's stages, less the last
    stage's tied head copy (one process has one tensor for both); DTensor shards (TP,
    FSDP) already count their global size. FLOPs per token describe the architecture:
    the family's formula on the whole model built on meta (no memory), as one process
    computes it (it counts the tied head once)."""
    import torch
    import torch.distributed as dist

    model = pipeline.model
    tied = sum(p.numel() for p in pipeline.tied_params)
    n = torch.tensor([count_params(model) - tied], dtype=torch.int64, device=pipeline.device)
    dist.all_reduce(n, group=pipeline.pp_group)
    fpt = None
    if spec.flops_per_token is not None:
        with torch.device("meta"):
            whole = spec.build(mcfg, facts)
        fpt = spec.flops_per_token(whole, mcfg.seq_len)
    return int(n.item()), fpt


def check_model_parallel(cfg, vocab_size: int | None, dims) -> None:
    """Every TP/PP constraint of `cfg` on the resolved layout `dims` (ParallelDims), as
    one ConfigError line (`vocab_size` None: not known yet, its TP divisibility is left
    to the ranks)."""
    p = cfg.parallel
    check_tp(cfg.model, vocab_size, dims.tp, p.sequence_parallel)
    if dims.pp > 1:
        if cfg.precision.dtype == "fp16":
            raise ConfigError("parallel.pp > 1 with precision.dtype='fp16' is not supported "
                              "(no loss scaler through the pipeline schedule); use bf16")
        if p.sequence_parallel and dims.tp > 1:
            # The schedule hands whole (B, T, D) hidden states between stages; under SP a
            # stage's output is its 1/tp sequence slice (parallel/pipeline_step.py).
            raise ConfigError("parallel.sequence_parallel with parallel.pp > 1 is not "
                              "supported: pipeline stages pass whole sequences, sequence "
                              "parallelism leaves each rank a 1/tp slice; drop one of them")
        if cfg.distill.teacher:  # the run's loss is computed on the last stage's logits
            raise ConfigError("distill.teacher with parallel.pp > 1 is not supported: the "
                              "last pipeline stage computes the loss without the inputs "
                              "the teacher reads")
        split = spec_of(cfg.model).pipeline
        if split is None:
            with_split = ", ".join(repr(n) for n, s in REGISTRY.items()
                                   if s.pipeline is not None)
            raise ConfigError(f"parallel.pp={dims.pp} needs a model family that splits "
                              f"into pipeline stages ({with_split}), not "
                              f"model.name={cfg.model.name!r}")
        batch = batch_plan(cfg, dims.dp, pp=dims.pp)  # pp > 1: mini-batch descent only
        check_pp(p, split.depth(cfg.model),
                 pipeline_microbatches(p, batch.per_rank, batch.micro))

