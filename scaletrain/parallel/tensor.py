"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) applied from outside the model
with `torch.distributed.tensor.parallel.parallelize_module` and the model family's plan
(models/plans.py). No hand-written communication: every collective is DTensor's.

Per transformer block (shapes for one rank of a `tp`-way mesh, D = d_model, F = d_ff):

    attn.c_attn  (3D, D) column-parallel, *per Q/K/V*: (3D/tp, D) = [Q_r; K_r; V_r]
    attn.c_proj  (D, D)  row-parallel: input (B, T, D/tp), partial sums all-reduced
    mlp.c_fc     (F, D)  column-parallel; mlp.c_proj (D, F) row-parallel

so each block costs one all-reduce in the forward and one in the backward per sublayer
(Megatron §3). The fused QKV weight stacks [Q; K; V] along its rows: a plain `Shard(0)`
would give rank 0 all of Q and half of K. `FusedColwiseParallel` instead shards each third
separately with DTensor's `_StridedShard(0, split_factor=3)` placement — locally
[Q_r; K_r; V_r], the heads r·H/tp .. (r+1)·H/tp — while the DTensor's global view stays the
unpermuted (3D, D) matrix, so seeded init (`distribute_tensor` of the full tensor) and
`full_tensor()` are layout-independent. The attention reads its local head count from the
weight's local shape (models/gpt.py), so the model itself has no TP code.

Vocabulary parallel: the token embedding (V, D) is sharded row-wise over the vocabulary
(each rank looks up its own rows, zero elsewhere, partial sums all-reduced) and the tied
output head uses *the same* `Shard(0)` DTensor as a column-parallel linear, so the logits
come out sharded over the vocabulary (B, T, V/tp). With `loss_parallel` the cross-entropy
is computed on those shards (torch `loss_parallel`: a max and a sum-exp all-reduce over
(B, T) instead of all-gathering (B, T, V) logits; Megatron §3 "parallel cross entropy").

Sequence parallel (optional; Korthikanti et al. 2022 §4.2.2): LayerNorms and dropout run on
(B, T/tp, D) slices of the residual stream; the row-parallel all-reduce becomes a
reduce-scatter and the column-parallel input an all-gather — the same bytes, 1/tp of the
norm/dropout activations.

Modules the plan does not split (position table, LayerNorms without SP) get replicated
DTensor parameters (`replicate_style`): bitwise identical on the tp ranks, with exact
gradients because every TP input (`from_local(.., Replicate)`) all-reduces its gradient
in the backward; DTensor everywhere because the optimizers' foreach kernels refuse a mix.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn as nn


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


def fsdp_shard_placement(param):
    """FSDP2 `shard_placement_fn` for TP models: shard a strided (fused QKV) weight on
    its input dim 1 — FSDP's dim-0 shard of a TP-local [Q_r; K_r; V_r] block cannot be
    described as a DTensor placement (full_tensor/DCP/init would be wrong); others None
    (the default Shard(0))."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard)
                                          for p in param.placements):
        return Shard(1)
    return None


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


def plan_sharded(model: nn.Module, plan: dict) -> set[str]:
    """Names of `model`'s parameters that `plan` shards over tp (the others are
    replicated): column-parallel weights and biases (a fused one's bias stays
    replicated), row-parallel weights (embedding rows included). For the planner
    (parallel/plan_report.py), which counts 1/tp of each."""
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


def fused_colwise(split: int = 3, **kw):
    """Public factory for plans: column-parallel over `split` fused output parts."""
    return _fused_colwise_style(split, **kw)


def check_tp(model_cfg, vocab_size: int | None, tp: int, sequence_parallel: bool) -> None:
    """ConfigError naming the constraint when the family's shape does not split `tp`
    ways (the sizes its plan shards: ModelSpec.tp_sizes, and the vocabulary)."""
    from scaletrain.errors import ConfigError
    from scaletrain.models.registry import REGISTRY, spec_of

    if tp <= 1:
        return
    m = model_cfg
    spec = spec_of(m)
    if spec.tp_plan is None:
        with_plan = ", ".join(repr(n) for n, s in REGISTRY.items() if s.tp_plan is not None)
        raise ConfigError(f"parallel.tp={tp} needs a model family with a tensor-parallel "
                          f"plan ({with_plan}), not model.name={m.name!r}")
    sizes = spec.tp_sizes(m) if spec.tp_sizes is not None else ()
    for what, n in (*sizes, ("the vocabulary size (model.vocab_size or the tokenizer's)",
                             vocab_size)):
        if n is not None and n % tp:  # vocab_size None: not known yet (world_checks.py)
            raise ConfigError(f"parallel.tp={tp} must divide {what}={n} "
                              "(each rank holds 1/tp of the heads, MLP columns and vocab)")
    if sequence_parallel and m.seq_len % tp:
        raise ConfigError(f"parallel.sequence_parallel needs parallel.tp={tp} to divide "
                          f"model.seq_len={m.seq_len}")


def apply_tp(model: nn.Module, tp_mesh, plan_fn, *, loss_parallel: bool = True,
             sequence_parallel: bool = False, tied=()) -> nn.Module:
    """Shard `model` (on meta or materialised) over the 1-D `tp_mesh` per `plan_fn`.

    `plan_fn(model, loss_parallel=, sequence_parallel=)` returns {module path: style}
    (models/plans.py). The `tied` pairs (ModelSpec.tied) are re-tied afterwards:
    `parallelize_module` gives every module its own new DTensor parameter.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    from scaletrain.models.contract import tie

    plan = plan_fn(model, loss_parallel=loss_parallel, sequence_parallel=sequence_parallel)
    parallelize_module(model, tp_mesh, plan)
    tie(model, tied)  # the head's weight = the embedding's: one (V, D) Shard(0) DTensor
    return model


def tp_loss_context(enabled: bool):
    """Context for forward + loss + backward with vocabulary-sharded logits."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor loss (loss_parallel's sum) as a plain tensor; others unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(loss, DTensor):
        return loss.full_tensor()
    return loss


@torch.no_grad()
def parallel_grad_norm(params, max_norm: float, pp_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of a TP/PP/FSDP model, clipped to `max_norm`
    (0 = measure only). Returns the norm (a plain tensor, same on every rank): fp32, or
    fp64 for fp64 gradients (verification runs must not round the clip coefficient).

    DTensor gradients (TP- or FSDP-sharded) contribute their global norm via DTensor's
    reductions; plain ones (replicated) their local norm. Pipeline stages hold disjoint
    parameters, so the squared norms are summed over the pp group (the only explicit
    collective here; torchtitan `clip_grad_norm_` does the same).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    out_dtype = torch.float32
    for g in grads:
        norm_dtype = torch.promote_types(g.dtype, torch.float32)  # fp64 stays fp64
        out_dtype = torch.promote_types(out_dtype, norm_dtype)
        n = torch.linalg.vector_norm(g, dtype=norm_dtype)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq += n.double() ** 2
    if pp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt().to(out_dtype)
    if max_norm > 0 and math.isfinite(max_norm):
        coef = float(max_norm) / (float(total) + 1e-6)
        if coef < 1.0:
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return total
