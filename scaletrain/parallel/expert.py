"""Expert parallelism (issue #17): an MoE layer's routed experts split over `ep` ranks,
tokens sent to the rank that owns their expert and the outputs sent back, both by
all-to-all (torchtitan `ExpertParallel`; GShard, Lepikhin et al. 2020).

Per MoE layer call on each rank (M: this rank's routed rows, sorted by global expert id
by models/moe.py `dispatch`, so the rows for one owner are contiguous; E experts,
El = E / ep per rank, rank j of the ep group owning experts [j·El, (j+1)·El)):

    counts   all_to_all of the (E,) counts: each rank learns how many rows each peer
             sends for each of its own experts, (ep, El); one host read of the splits
    tokens   all_to_all_single of the rows with uneven splits (M, D) -> (R, D), ordered
             (source, expert); a stable sort makes them expert-major for the grouped
             matmul over the El local experts
    experts  models/moe.py `swiglu_experts` on the local weights
    back     the inverse permutation, then the reverse all_to_all (R, D) -> (M, D)

Autograd: torch.distributed._functional_collectives.all_to_all_single has a backward
that is the reverse all-to-all (swapped splits) — torch's replacement for the deprecated
torch.distributed.nn.functional one — so no hand-written autograd Function is needed.

Weights: the experts' (E, D, F) parameters become DTensors sharded on dim 0 over the
"ep" dimension of the expert mesh (config/dims.py `build_expert_mesh`): the logical
tensor stays (E, D, F), which is what the checkpoint (DCP) saves, so a run with another
ep degree (or one process) loads it. FSDP2 then shards each rank's slice again over the
"efsdp" ranks (parallel/fsdp.py). Under TP (EP × TP) the weights live on the ("ep", "tp")
sub-mesh, Shard(0) over ep and Replicate over tp: the tp ranks of a group hold the same
slice and run the same exchange with their own ep peers (config/dims.py). The forward
takes `to_local()`, whose backward keeps each tp rank's own (identical) gradient as the
replicated one — nothing sums it over tp, exactly as MoE × TP's replicated experts
(models/tp_styles.py `replicated_experts`): the layer's input and its output's gradient
are the same on every tp rank. FSDP2 composes "FSDP + EP + TP" DTensors (its 3-D
(efsdp, ep, tp) spmd mesh), and DCP saves the tp replicas once.

Gradient scale: the step multiplies each rank's loss by dp because FSDP2 *averages*
gradients over the dp ranks (parallel/context.py). An expert's gradient on a rank
already sums the contributions of its whole ep group's tokens (the reverse all-to-all),
and FSDP2 averages it over the efsdp = dp / ep ranks only: dp / efsdp = ep times the
global gradient. The forward therefore hands the weights to the matmuls through
`_GradScale(1 / ep)`. (torchtitan uses FSDP2's set_gradient_divide_factor(dp) instead:
on gloo that needs PREMUL_SUM, which gloo lacks, and with one efsdp rank torch 2.13's
FSDP2 divides twice in fp64.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from scaletrain.models.moe import GroupedExperts, moe_layers, swiglu_experts

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class ExpertExchange:
    """The two all-to-alls of one expert-parallel group (`group` of `ep` ranks) for
    layers of `n_experts` routed experts."""

    def __init__(self, group, ep: int, n_experts: int):
        self.group, self.ep, self.n_local = group, ep, n_experts // ep

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple:
        """Rows x (M, D) sorted by global expert, counts (E,) -> (rows for the local
        experts, expert-major (R, D); their (El,) counts; what `combine` needs)."""
        ep, el = self.ep, self.n_local
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)  # equal splits of El
        recv = recv.view(ep, el)  # [source, local expert] rows
        # The one host read: rows this rank sends to / receives from each peer.
        send_splits, recv_splits = torch.stack([counts.view(ep, el).sum(1),
                                                recv.sum(1)]).tolist()
        got = funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), recv_splits,
                                                          send_splits, self.group))
        # Received segment i = s·El + e (source s, local expert e) gets the key e·ep + s:
        # a stable argsort groups the rows by local expert, each source's order kept.
        i = torch.arange(ep * el, device=x.device)
        key = torch.repeat_interleave((i % el) * ep + i // el, recv.reshape(-1))
        perm = torch.argsort(key, stable=True)
        return got[perm], recv.sum(0), (perm, send_splits, recv_splits)

    def combine(self, y: torch.Tensor, plan: tuple) -> torch.Tensor:
        """Local experts' outputs y (R, D), expert-major -> (M, D) in the caller's order."""
        perm, send_splits, recv_splits = plan
        back = y.index_select(0, torch.argsort(perm))  # (source, expert) order again
        return funcol.wait_tensor(funcol.all_to_all_single(back, send_splits, recv_splits,
                                                           self.group))


class _GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.scale, None


class ExpertParallelExperts(nn.Module):
    """Drop-in for GroupedExperts (same forward contract and parameter names, so state
    dicts and checkpoints are unchanged) whose weights are (E, D, F) DTensors sharded on
    the experts over the ep mesh, and whose forward exchanges the rows."""

    def __init__(self, experts: GroupedExperts, weight_mesh):
        """`weight_mesh`: the expert mesh's ("ep",) or, under TP, ("ep", "tp") sub-mesh
        (`weight_mesh_of`)."""
        super().__init__()
        ep_mesh = weight_mesh["ep"] if weight_mesh.ndim > 1 else weight_mesh
        ep = ep_mesh.size()
        # Shard(0) over ep; Replicate over tp when the mesh has it (module docstring).
        placements = [Shard(0)] + [Replicate()] * (weight_mesh.ndim - 1)
        for name in EXPERT_WEIGHTS:
            w = getattr(experts, name)
            # On meta (before materialisation): the local slice's shape only, no data.
            local = torch.empty((w.shape[0] // ep, *w.shape[1:]), dtype=w.dtype,
                                device=w.device)
            setattr(self, name, nn.Parameter(DTensor.from_local(
                local, weight_mesh, placements, run_check=False, shape=w.shape,
                stride=w.stride())))
        self.exchange = ExpertExchange(ep_mesh.get_group(), ep, experts.gate_proj.shape[0])

    # Under train.compile the exchange runs eagerly (one graph break per MoE layer): its
    # host read of the splits is data-dependent, as the segment loop's is (traced, the
    # code after it would be re-specialised on the splits of every batch:
    # models/moe.py `segment_matmul`), and the rest is communication and the segment
    # loop, nothing inductor would fuse.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        rows, local_counts, plan = self.exchange.dispatch(x, counts)
        # Under FSDP2 the weights arrive all-gathered over efsdp: this rank's El experts.
        w = [_GradScale.apply(getattr(self, n).to_local(), 1.0 / self.exchange.ep)
             for n in EXPERT_WEIGHTS]
        return self.exchange.combine(swiglu_experts(rows, *w, local_counts), plan)


def weight_mesh_of(expert_mesh):
    """The sub-mesh of the expert mesh (config/dims.py `build_expert_mesh`) that the
    experts' weights are DTensors on: ("ep", "tp") when it has a tp dimension, else
    ("ep",)."""
    if "tp" in (expert_mesh.mesh_dim_names or ()):
        return expert_mesh["ep", "tp"]
    return expert_mesh["ep"]


def apply_ep(model: nn.Module, expert_mesh) -> list[ExpertParallelExperts]:
    """Replace every MoE layer's `experts` by its expert-parallel version over the
    expert mesh (in place, on the meta-built model, before TP: the TP plan leaves an
    expert-parallel experts module alone, models/plans.py `moe_tp_plan`); returns the
    new modules (FSDP2's expert units)."""
    out = []
    weight_mesh = weight_mesh_of(expert_mesh)
    for layer in moe_layers(model).values():
        layer.experts = ExpertParallelExperts(layer.experts, weight_mesh)
        out.append(layer.experts)
    return out


def ep_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """The global gradient norm (and clip to `max_norm`; math.inf: measure only) over
    gradients that are DTensors on different meshes — the dense ones on the dp_shard
    mesh, the experts' on the expert mesh — which torch's clip cannot stack: one norm per
    mesh, made full (a reduction over that mesh), then combined (torchtitan
    `_clip_grad_norm_with_ep`)."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(id(getattr(p.grad, "device_mesh", None)), []).append(p)
    sq = torch.zeros((), dtype=torch.float64)
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
        n = n.full_tensor() if hasattr(n, "full_tensor") else n
        sq = sq + n.double().square()
    total = sq.sqrt().to(next(iter(groups.values()))[0].dtype) if groups else sq
    if max_norm != math.inf:
        for group in groups.values():  # a mesh per call: foreach ops need one mesh
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
