"""A mixture-of-experts SwiGLU feed-forward for the llama family (Shazeer et al. 2017;
Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024; DeepSeek-V3, 2024; Qwen3-MoE).

One MoE layer replaces a block's dense `mlp`: a router (`gate`, a (E, D) linear as in
transformers' Mixtral / Qwen3-MoE) scores the E routed experts per token, each token goes
to its top-k, and always-on shared experts (DeepSeek / Qwen-MoE) add a dense SwiGLU.

The computation, per layer call, over the N = B·T tokens (shapes in comments):
  route     logits (N, E) -> top-k experts (N, k) and their weights (N, k)
  dispatch  the N·k assignments sorted by expert once (a stable argsort: token order kept
            within an expert), tokens gathered into that order (M, D), counts per expert;
            with a capacity factor the overflow beyond each expert's capacity is dropped
  experts   one grouped matmul per projection over the sorted tokens: weights are 3-D
            parameters (E, D, F) / (E, F, D), so expert parallelism and FSDP shard dim 0
  combine   outputs weighted by the router and scattered back to their tokens (index_add)
Expert parallelism (parallel/expert.py) replaces the `experts` module only: its
forward(sorted rows, counts) contract is the seam. The replacement sends each expert's
contiguous rows to the rank that owns it (all-to-all), runs `swiglu_experts` on its own
experts and sends the outputs back; route, dispatch and combine stay as they are.

Grouped matmul: `torch._grouped_mm` (one kernel for all experts) where torch has it for
the device and dtype: bf16 on CUDA and CPU, bf16 autocast included; else a loop over the
E experts, one matmul per expert's contiguous segment of the sorted tokens (E matmuls per
projection, never one per token): fp32, fp64 (which verification runs need) and widths
its 16-byte stride rule refuses. Under train.compile
the loop runs eagerly inside the compiled block (`segment_matmul`: its host read of the
counts); the grouped kernel has no host read and traces.

Losses, as per-token *sums* (the step divides them by the step's global target count,
as it does the summed cross-entropy, so accumulation and data parallel stay the
large-batch step exactly): the load-balancing loss in Switch / Mixtral form
E · Σ_e f_e · P_e (f_e: the share of the sequence's assignments routed to e, summing to
k; P_e: the mean router probability of e), computed per *sequence* — the unit no
micro-batching or data-parallel split ever cuts, which is what makes it exact (a
per-micro-batch f would change with the accumulation; DeepSeek-V3 uses the same
sequence-wise form) — times the sequence's length; and the router z-loss
logsumexp(logits)² per token (ST-MoE, Zoph et al. 2022).

The DeepSeek-V3 router (`sigmoid_bias`) picks experts by sigmoid score + a per-expert
bias that is not trained: `expert_bias` is a buffer (saved in checkpoints) that
models/moe_terms.py moves by ±rate toward balance after each optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor



@dataclass(frozen=True)
class MoeSettings:
    experts: int
    top_k: int
    d_ff: int
    router: str = "softmax"  # "softmax" | "sigmoid_bias"
    norm_topk_prob: bool = True
    aux_loss: float = 0.0
    z_loss: float = 0.0
    capacity_factor: float = 0.0  # 0: no drop


@dataclass
class MoeForward:
    """What the last training forward of one MoE layer leaves for the step
    (models/moe_terms.py): the loss terms (per-token sums, with their graph) and
    detached load statistics."""

    loss: torch.Tensor  # aux_loss · aux + z_loss · z, with its graph
    aux: torch.Tensor  # Σ_seq T · E · Σ_e f_e P_e (detached, no coefficient)
    z: torch.Tensor  # Σ_t logsumexp(logits_t)² (detached, no coefficient)
    load: torch.Tensor  # (E,) assignments routed to each expert, before any drop
    dropped: torch.Tensor  # assignments dropped by the capacity limit
    tokens: int  # tokens routed (N)


def _up(t: torch.Tensor) -> torch.Tensor:
    """Router math in at least fp32 (bf16 logits would make near ties flip)."""
    return t if t.dtype == torch.float64 else t.float()


def route(logits: torch.Tensor, s: MoeSettings, bias: torch.Tensor | None) -> tuple:
    """logits (N, E) -> (weights (N, k) in the logits' upcast dtype, experts (N, k) int64,
    probabilities (N, E) for the balance loss).

    softmax: top-k of softmax(logits), weights renormalised if norm_topk_prob (which
    equals Mixtral's softmax over the top-k logits). sigmoid_bias: scores sigmoid(logits),
    the top-k of scores + bias chosen (the bias steers the choice only, not the weights),
    weights the chosen scores (renormalised if norm_topk_prob); probabilities the scores
    normalised over experts (DeepSeek-V3's sequence-wise balance loss)."""
    lg = _up(logits)
    if s.router == "softmax":
        probs = lg.softmax(dim=-1)
        weights, experts = probs.topk(s.top_k, dim=-1)
    else:
        scores = lg.sigmoid()
        _, experts = (scores + bias.to(scores.dtype)).topk(s.top_k, dim=-1)
        weights = scores.gather(-1, experts)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    if s.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


@dataclass
class Dispatch:
    """Assignments sorted by expert: `order` (M,) indexes the flat (N·k) assignments,
    `tokens` (M,) their token rows, `counts` (E,) int64 per expert after any drop."""

    order: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor


def dispatch(experts: torch.Tensor, n_experts: int, capacity: int) -> Dispatch:
    """Sort the (N, k) assignments by expert (stable: within an expert, token order),
    dropping those past `capacity` per expert (0: none), Switch's rule: the earliest
    tokens keep their place."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, n_experts)
    dropped = torch.zeros((), dtype=torch.int64, device=flat.device)
    if capacity and not isinstance(flat, FakeTensor):  # the plan measures without drops
        starts = torch.cumsum(counts, 0) - counts  # each expert's first sorted slot
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        keep = rank_in_expert < capacity
        order = order[keep]
        kept = counts.clamp(max=capacity)
        dropped = (counts - kept).sum()
        counts = kept
    return Dispatch(order, order // experts.shape[1], counts, dropped)


def expert_counts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert of the flat expert ids (a scatter-add: a static
    shape, which the plan's fake tensors can run, unlike bincount's)."""
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def segment_sizes(counts: torch.Tensor, rows: int) -> list[int]:
    """The per-expert row counts on the host. On the plan's fake tensors (no values:
    plan/activations.py) an even split of the rows: what the experts save for the
    backward depends on the total rows only, not on how they are split."""
    if isinstance(counts, FakeTensor):
        E = counts.shape[0]
        return [rows // E + (e < rows % E) for e in range(E)]
    return counts.tolist()


def combine(y: torch.Tensor, d: Dispatch, weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Expert outputs y (M, D) in dispatch order -> (N, D): each weighted by its router
    weight and summed into its token's row (dropped assignments add nothing)."""
    w = weights.reshape(-1)[d.order].to(y.dtype)
    out = torch.zeros(n_tokens, y.shape[1], dtype=y.dtype, device=y.device)
    return out.index_add_(0, d.tokens, y * w[:, None])


def expert_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on for x's device
    (bf16 training keeps the residual stream, so x, in fp32; autocast runs matmuls in
    its own dtype), else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# torch._grouped_mm's kernels, bf16 (torch 2.13): CUDA; CPU, with autograd. The CPU one
# also runs fp32 eagerly, but its meta function (fake tensors: torch.compile's tracing,
# the plan's measured blocks) accepts bf16 only, so fp32 takes the segment loop; fp64 has
# no kernel.
GROUPED_MM_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.bfloat16,)}


def use_grouped_mm(device_type: str, dtype: torch.dtype, in_width: int,
                   out_width: int) -> bool:
    """torch._grouped_mm where torch provides it for the device and dtype, and the rows
    of both operands are 16-byte aligned (its stride rule: a width that is a multiple of
    8 in bf16, of 4 in fp32)."""
    size = torch.empty((), dtype=dtype).element_size()
    return (hasattr(torch, "_grouped_mm")
            and dtype in GROUPED_MM_DTYPES.get(device_type, ())
            and in_width * size % 16 == 0 and out_width * size % 16 == 0)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *,
                   grouped: bool | None = None) -> torch.Tensor:
    """x (M, A) sorted by expert, w (E, A, B), counts (E,) -> (M, B): rows of expert e
    times w[e]. `grouped`: force torch._grouped_mm (True) or the segment loop (False);
    None = `use_grouped_mm` in the matmuls' dtype (`expert_dtype`: under bf16 autocast
    the fp32 rows and weights are cast once for the one kernel, where the segment loop's
    autocast casts each expert's weight per matmul)."""
    dtype = expert_dtype(x)
    if grouped if grouped is not None else use_grouped_mm(x.device.type, dtype, x.shape[-1],
                                                           w.shape[-1]):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x.to(dtype), w.to(dtype), offs=offs)
    return segment_matmul(x, w, counts)


# Under train.compile (parallel/compile.py) the segment loop runs eagerly: one graph
# break per call. Its host read of the counts is data-dependent: traced, dynamo breaks
# at the read anyway, then specialises the code after it on the split sizes, which
# change every batch — moe-tiny-like blocks hit dynamo's recompile limit (8) within 3
# steps and ran eagerly from then on (15 graphs instead of 6; torch 2.13). What it runs,
# E per-expert matmuls, are extern GEMM kernels that inductor would not fuse; the
# router, the dispatch sort, the combine and the shared experts around it stay compiled.
# torch._grouped_mm (above) has no host read and traces.
@torch.compiler.disable
def segment_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (M, A) sorted by expert, w (E, A, B), counts (E,) -> (M, B) by one host read of
    the counts, then one matmul per expert's segment."""
    segments = x.split(segment_sizes(counts, x.shape[0]))
    return torch.cat([seg @ w[e].to(x.dtype) for e, seg in enumerate(segments)])


class GroupedExperts(nn.Module):
    """E SwiGLU experts as 3-D weights: gate_proj, up_proj (E, D, F), down_proj (E, F, D)
    (x @ w layout, so a grouped matmul needs no transpose)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return swiglu_experts(x, self.gate_proj, self.up_proj, self.down_proj, counts)


def swiglu_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The experts' SwiGLU on rows x (M, D) sorted by expert, counts (E,) per expert of
    the E experts whose weights are given: (M, D). GroupedExperts runs it on all E; under
    expert parallelism (parallel/expert.py, which replaces the `experts` module) each
    rank runs it on the tokens it received for its own E / ep experts."""
    h = F.silu(grouped_matmul(x, gate, counts)) * grouped_matmul(x, up, counts)
    return grouped_matmul(h, down, counts)


class MoE(nn.Module):
    """The MoE feed-forward of one block: (B, T, D) -> (B, T, D). `shared`: the always-on
    experts as one dense SwiGLU (n_shared · d_ff wide), or None."""

    def __init__(self, d_model: int, s: MoeSettings, shared: nn.Module | None = None):
        super().__init__()
        self.settings = s
        self.gate = nn.Linear(d_model, s.experts, bias=False)
        self.experts = GroupedExperts(s.experts, d_model, s.d_ff)
        self.shared_experts = shared
        # DeepSeek-V3's balancing bias: not a parameter (no gradient, no optimizer state),
        # but model state (checkpointed); models/moe_terms.py updates it after the step.
        self.register_buffer("expert_bias", torch.zeros(s.experts)
                             if s.router == "sigmoid_bias" else None)
        self.last: MoeForward | None = None

    def capacity(self, n_tokens: int) -> int:
        s = self.settings
        if not s.capacity_factor:
            return 0
        return max(1, math.ceil(s.capacity_factor * n_tokens * s.top_k / s.experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        s = self.settings
        flat = x.reshape(B * T, D)
        logits = self.gate(flat)  # (N, E)
        weights, experts, probs = route(logits, s, self.expert_bias)
        d = dispatch(experts, s.experts, self.capacity(B * T))
        y = self.experts(flat[d.tokens], d.counts)  # (M, D)
        out = combine(y, d, weights, B * T).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.training:
            self.last = self._terms(logits, experts, probs, d, B, T)
        return out.view(B, T, D)

    def _terms(self, logits, experts, probs, d: Dispatch, B: int, T: int) -> MoeForward:
        """The layer's loss terms and load of this forward (see the module docstring)."""
        s = self.settings
        E = s.experts
        load = expert_counts(experts.reshape(-1), E)
        lg = _up(logits)
        # f (B, E): per-sequence share of assignments (no gradient, as in Switch); P (B, E):
        # per-sequence mean probability; × T: a sum over the sequence's tokens. Both terms
        # are computed for the metrics whatever the coefficients; the loss only keeps the
        # graph of those with a coefficient.
        onehot = F.one_hot(experts.view(B, T * s.top_k), E).to(lg.dtype)
        f = onehot.sum(dim=1) / T
        p = probs.view(B, T, E).mean(dim=1)
        aux = T * E * (f * p).sum()
        z = torch.logsumexp(lg, dim=-1).square().sum()
        loss = lg.new_zeros(())
        if s.aux_loss:
            loss = loss + s.aux_loss * aux
        if s.z_loss:
            loss = loss + s.z_loss * z
        return MoeForward(loss, aux.detach(), z.detach(), load.detach(), d.dropped, B * T)


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """{module path: MoE layer} of a model (through DDP / compile wrappers)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
