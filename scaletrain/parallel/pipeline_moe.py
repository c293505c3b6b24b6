"""Mixture-of-experts loss terms through a pipeline schedule (parallel.pp > 1).

Without a pipeline the step adds each micro-batch's MoE terms (the balance and z losses,
per-token sums: models/moe_terms.py) to the loss it backpropagates (train/step.py). A
pipeline schedule backpropagates the last stage's loss only; every other stage's backward
starts from the gradient its output receives from the next stage. So each stage attaches
its own MoE layers' terms to its output right after its forward (`Pipeline` registers
`attach_terms` as a forward hook on each stage module): an identity in the forward whose
backward also hands the terms the gradient 1 — Megatron-LM's `MoEAuxLossAutoScaler`
(megatron/core/transformer/moe/moe_utils.py). The terms enter the gradient once per
micro-batch and stage, scaled as the step scales them (÷ the step's global target count,
× the loss multiplier), whatever schedule orders the backwards; the logged loss stays the
cross-entropy, as without a pipeline.

The statistics (load, dropped, aux, z per layer) go into the rows of the *whole* model's
MoE layers (`pipeline_moe_terms`): a pipeline rank fills its stages' rows, the others
stay zero, and the step's reducer sums over every rank (dp × pp; under TP only the first
tp rank of each group adds its rows, the others' being copies), so each rank ends the
step with every layer's global row — the record (metrics.jsonl) and each stage's
sigmoid_bias update see what one process sees.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scaletrain.models.moe_terms import MoeStepTerms, moe_step_terms
from scaletrain.parallel.meshes import coordinate


class _WithLossGrad(torch.autograd.Function):
    """forward(output, loss) = output; backward: the output's gradient passes through
    and `loss` gets 1 — `loss` joins the backward that starts at `output`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        return grad_output, torch.ones(shape, dtype=dtype, device=device)


def with_loss_grad(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`output` unchanged, with `loss` (0-d, with its graph) backpropagated alongside."""
    return _WithLossGrad.apply(output, loss)


def world_sum(t: torch.Tensor, counted: bool = True) -> torch.Tensor:
    """All-reduce SUM over every rank (in place): the stages' rows are disjoint, the
    data-parallel ranks' rows add up. `counted` False: this rank adds zeros — a tp rank
    other than the first, whose rows repeat its tp group's (the MoE layers are
    replicated over tp: models/plans.py `moe_tp_plan`), so the sum counts each once
    without a process group of its own (and x + 0 is exact)."""
    if not counted:
        t.zero_()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def pipeline_moe_terms(pm, mcfg, facts: dict, device: torch.device,
                       mesh=None) -> MoeStepTerms | None:
    """The step's MoE terms of a pipeline rank (`pm`: its ParallelModel): rows for every
    MoE layer of the whole model (built on meta for their names and settings, no memory),
    summed over every rank of the world `mesh` (its tp ranks counted once); None for a
    model without MoE layers."""
    with torch.device("meta"):
        whole = pm.spec.build(mcfg, facts)
    counted = coordinate(mesh, "tp") == 0
    return moe_step_terms(pm.module, lambda t: world_sum(t, counted),
                          mcfg.moe_bias_update_rate, whole=whole, device=device)
