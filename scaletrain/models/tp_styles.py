"""The tensor-parallel styles the family plans (models/plans.py) use beyond torch's own:
a column-parallel linear over fused parts ([Q; K; V], each sharded separately with
DTensor's `_StridedShard`) and replicated parameters for the modules TP does not split.
parallel/tensor.py explains the layout; this module sits beside the models so that a
family's plan needs nothing from the parallel package.

torch.distributed.tensor is imported inside the factories: it is slow to import and
absent from builds without distributed support, and plain (one-process) runs never
build a plan.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from scaletrain.models.moe import swiglu_experts


def _fused_colwise_style(split: int, **kw):
    """A ColwiseParallel whose weight is sharded per fused part (see module doc)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    strided = [_StridedShard(0, split_factor=split)]

    def forward(mod, x):
        # x: replicated DTensor (B, T, D); weight (split*D, D) strided over tp, so the
        # local output is (B, T, split*D/tp) = [q_r, k_r, v_r].
        y = torch.nn.functional.linear(x, mod.weight).to_local()
        if mod.bias is not None:
            # The bias is a replicated DTensor (FSDP can then shard it on dim 0 without
            # composing two strided shardings); cutting this rank's [bq_r, bk_r, bv_r] is
            # a redistribute, whose backward all-gathers the bias gradient.
            y = y + mod.bias.redistribute(mod.bias.device_mesh, strided).to_local()
        return y

    class FusedColwiseParallel(ColwiseParallel):
        """Column-parallel for a linear whose output rows are `split` stacked parts
        ([Q; K; V]): rank r computes rows r/tp of *each* part."""

        bias_sharded = False  # the bias stays replicated (see `forward`)

        def _partition_linear_fn(self, name, module, device_mesh):
            for pname, p in list(module.named_parameters(recurse=False)):
                placement = strided if pname == "weight" else [Replicate()]
                module.register_parameter(pname, nn.Parameter(
                    distribute_tensor(p, device_mesh, placement),
                    requires_grad=p.requires_grad))

        def _apply(self, module, device_mesh):
            module.forward = types.MethodType(forward, module)  # this instance only
            return distribute_module(
                module, device_mesh, self._partition_linear_fn,
                lambda mod, inputs, mesh: self._prepare_input_fn(
                    self.input_layouts, self.desired_input_layouts, mod, inputs, mesh),
                lambda mod, out, mesh: out.to_local() if isinstance(out, DTensor) else out)

    return FusedColwiseParallel(**kw)


def replicate_style(output_layout=None):
    """Parameters as replicated DTensors; inputs and outputs stay plain tensors.

    For the modules TP does not split (position table, LayerNorms without SP): every
    parameter must be a DTensor on the tp mesh, because the optimizers' foreach kernels
    refuse a mix of DTensor and plain tensors. `output_layout`: optionally hand on only
    this rank's part of the output (Shard(0) of the position table under SP).
    """
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateParallel(ParallelStyle):
        def _apply(self, module, mesh):
            def inputs(mod, args, mesh):
                return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                             if isinstance(a, torch.Tensor) and not isinstance(a, DTensor)
                             else a for a in args)

            def outputs(mod, out, mesh):
                if output_layout is not None:
                    out = out.redistribute(mesh, [output_layout])
                return out.to_local()

            return distribute_module(module, mesh, None, inputs, outputs)

    return ReplicateParallel()


def replicated_experts():
    """An MoE layer's routed experts (models/moe.py `GroupedExperts`, (E, D, F) weights)
    replicated over tp: parameters as Replicate DTensors (the optimizers' foreach kernels
    and FSDP2's 2-D sharding need DTensors on the tp mesh, as `replicate_style` says),
    the forward run on their local values — the sorted rows, the counts and the segment
    loop are plain tensors, which DTensor's dispatch would not take (the host read of
    the counts) or would only slow down.

    Gradients: `to_local()`'s backward wraps the local gradient as Replicate (its
    default grad_placements), so each tp rank keeps the gradient of its own, identical,
    computation — the whole layer's, not 1/tp of it, and nothing sums it over tp. That
    is exact because the layer's input and its output's gradient are the same on every
    tp rank (models/plans.py `moe_tp_plan`)."""
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    def forward(mod, x, counts):
        return swiglu_experts(x, mod.gate_proj.to_local(), mod.up_proj.to_local(),
                              mod.down_proj.to_local(), counts)

    class ReplicatedExperts(ParallelStyle):
        def _apply(self, module, mesh):
            distribute_module(module, mesh)  # every parameter a Replicate DTensor
            module.forward = types.MethodType(forward, module)  # this instance only
            return module

    return ReplicatedExperts()


def vocab_embedding(stream):
    """Vocabulary-parallel token embedding (every family's): rows of (V, D) sharded
    over tp; each rank looks up its rows and the partial lookups are summed
    (all-reduce, or reduce-scatter along T into `stream` = Shard(1) with SP)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel

    return RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)


def vocab_head(stream, loss_parallel: bool):
    """Column-parallel output head over the vocabulary (a tied weight shares the
    embedding's Shard(0) rows): the logits (B, T, V/tp) stay sharded for TP's
    loss_parallel, else they are all-gathered; `stream`: the residual stream's layout
    coming in (Shard(1) with SP, else Replicate())."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel(input_layouts=stream,
                           output_layouts=Shard(-1) if loss_parallel else Replicate(),
                           use_local_output=not loss_parallel)


def fused_colwise(split: int = 3, **kw):
    """Public factory for plans: column-parallel over `split` fused output parts."""
    return _fused_colwise_style(split, **kw)


def plan_sharded(model: nn.Module, plan: dict) -> set[str]:
    """Names of `model`'s parameters that `plan` shards over tp (the others are
    replicated): column-parallel weights and biases (a fused one's bias stays
    replicated), row-parallel weights (embedding rows included). For the planner
    (plan/report.py), which counts 1/tp of each."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    out = set()
    for path, style in plan.items():
        if isinstance(style, ColwiseParallel):
            leaves = ("weight", "bias") if getattr(style, "bias_sharded", True) else ("weight",)
        elif isinstance(style, RowwiseParallel):
            leaves = ("weight",)
        else:
            continue
        module = model.get_submodule(path)
        out.update(f"{path}.{leaf}" for leaf in leaves
                   if getattr(module, leaf, None) is not None)
    return out
