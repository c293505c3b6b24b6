"""fp32 master weights and fp32 optimizer state for low-precision (bf16-pure) parameters.

With bf16 parameters an update smaller than half a bf16 ulp (2^-8 relative) rounds
away: lr·grad ≈ 1e-3 on a weight of 1.0 never moves it, and a torch optimizer would also
keep its moments in bf16. Mixed-precision training keeps an fp32 master copy that the
optimizer updates and copies back rounded (Micikevicius et al. 2018, "Mixed Precision
Training", §3.1). torch has no such optimizer for CPU; this module adds it to any
`torch.optim` optimizer with its step and state-dict hooks, written by hand because no
maintained library offers it:

- step pre-hook: each parameter's storage is swapped for its fp32 master
  (`state[p]["master"]`, created from the parameter on the first step) and its gradient
  cast to fp32, so the unchanged torch update runs in fp32 and creates fp32 state;
- step post-hook: the bf16 storage receives the master rounded to bf16 and is swapped
  back; the gradient is released (the step's zero_grad would drop it anyway).

The optimizer's parameters stay the model's own `Parameter` objects, so the optimizer
state is keyed like any other (torch.distributed.checkpoint maps it to parameter names)
and the master travels in it as one more state tensor, which is what makes a resume
exact. `load_state_dict` normally casts state to the parameter dtype; the load hooks
present fp32 parameters during the load so the masters and moments stay fp32.

Scope: whole tensors (single process, DDP). Sharded DTensor parameters (FSDP2) are
left to FSDP: swapping a DTensor's storage does not change its dtype metadata, and
FSDP2's `MixedPrecisionPolicy` (fp32 shards, bf16 all-gathered compute) is the sharded
form of the same idea (parallel/parallelize.py decides what bf16-pure means there).
"""

from __future__ import annotations

import torch

MASTER = "master"  # the key of the fp32 master copy in the optimizer state


def _params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The optimizer's plain-tensor parameters (DTensors excluded, see above)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    return [p for g in opt.param_groups for p in g["params"] if not isinstance(p, DTensor)]


def add_master_weights(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Hook `opt` (over low-precision parameters) to update fp32 masters; returns it."""
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @torch.no_grad()
    def to_masters(optimizer, args, kwargs):
        for p in _params(optimizer):
            if p.grad is None or p.dtype == torch.float32:
                continue
            master = optimizer.state[p].get(MASTER)
            if master is None:
                master = p.detach().to(torch.float32, copy=True)
            grad = p.grad.to(torch.float32)
            swapped.append((p, p.data))
            p.data = master  # the update now runs on the fp32 master
            p.grad = grad

    @torch.no_grad()
    def to_model(optimizer, args, kwargs):
        for p, low in swapped:
            master = p.data
            low.copy_(master)  # round to the model's dtype
            p.grad = None
            p.data = low
            optimizer.state[p][MASTER] = master
        swapped.clear()

    lows: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def before_load(optimizer, state_dict):
        for p in _params(optimizer):  # fp32 views, so state is cast to fp32
            if p.dtype != torch.float32:
                lows.append((p, p.data))
                p.data = p.data.to(torch.float32)

    @torch.no_grad()
    def after_load(optimizer):
        for p, low in lows:
            master = optimizer.state[p].get(MASTER)
            if master is not None:
                low.copy_(master)  # the model holds the rounded master
            p.data = low
        lows.clear()

    opt.register_step_pre_hook(to_masters)
    opt.register_step_post_hook(to_model)
    opt.register_load_state_dict_pre_hook(before_load)
    opt.register_load_state_dict_post_hook(after_load)
    # Optimizers that create their state at construction (Adagrad's sums) made it in the
    # parameters' low precision: promote it.
    for p in _params(opt):
        # .get: indexing the state defaultdict would add an empty entry per parameter,
        # and torch.distributed.checkpoint takes a non-empty `state` as initialised —
        # it then loads no optimizer state at all on resume.
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32:
                opt.state[p][k] = v.to(torch.float32)
    return opt
