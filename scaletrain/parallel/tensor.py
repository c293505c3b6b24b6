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
separately with DTensor's `_StridedShard(0, split_factor=3)` placement (the styles the
plans use are models/tp_styles.py's) — locally
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

Mixture-of-experts layers (models/plans.py `moe_tp_plan`): the router and the (E, D, F)
routed experts are replicated over tp (every rank routes the same, whole sequence: under
SP the layer gathers its input and cuts its output), the shared experts are sharded
like the dense MLP, so the MoE statistics and loss terms are counted once.

Modules the plan does not split (position table, LayerNorms without SP) get replicated
DTensor parameters (`replicate_style`): bitwise identical on the tp ranks, with exact
gradients because every TP input (`from_local(.., Replicate)`) all-reduces its gradient
in the backward; DTensor everywhere because the optimizers' foreach kernels refuse a mix.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scaletrain.errors import ConfigError
from scaletrain.models.contract import tie
from scaletrain.models.registry import REGISTRY, spec_of


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


def check_tp(model_cfg, vocab_size: int | None, tp: int, sequence_parallel: bool) -> None:
    """ConfigError naming the constraint when the family's shape does not split `tp`
    ways (the sizes its plan shards: ModelSpec.tp_sizes, and the vocabulary)."""
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
