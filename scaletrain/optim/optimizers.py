"""Optimizers from `torch.optim`, with weight decay only where it belongs.

Decay applies to >=2-D weights (matrices, conv kernels); never to biases, norm scales or
weight-norm magnitudes, and to embedding tables only if `optim.decay_embeddings`
(nanoGPT/GPT-3 practice). For AdamW the decay is decoupled (Loshchilov & Hutter 2019);
for the others `weight_decay` is the classic L2 term torch adds to the gradient.

`optim.implementation` picks torch's kernel: "foreach" (one batched op per update term),
"fused" (one kernel for the whole update; torch has it for SGD, Adam, AdamW and Adagrad,
on CPU and CUDA) or "for-loop" (the reference per-parameter loop). "auto" (the default)
is "fused" where torch has it, else "foreach" (torchtitan's default too): one pass over
parameters, gradients and state instead of ~10. gpt-10m's AdamW step on this 2-core CPU:
foreach 30.7 ms, fused 9.5 ms (`torch.compile(opt.step)` 14 ms), ~6% of a bf16 step.
Same update to rounding: the kernels order the same fp32 arithmetic differently.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scaletrain.config.schema import OptimConfig
from scaletrain.errors import ConfigError
from scaletrain.optim.adamw8bit import build_adamw8bit
from scaletrain.optim.master_weights import add_master_weights

FUSED = ("sgd", "adam", "adamw", "adagrad")  # torch.optim classes with `fused=`


def _no_decay_by_shape(name: str, p: torch.Tensor) -> bool:
    # weight_norm's magnitude g ("...parametrizations.weight.original0", shape (out, 1))
    # is a scale like a norm's, not a weight matrix.
    return p.dim() < 2 or name.endswith("parametrizations.weight.original0")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool,
                 embedding_copies=()) -> list[dict]:
    """[{params to decay, weight_decay}, {the others, 0.0}] (empty groups dropped).

    `embedding_copies`: names of parameters that are copies of a tied embedding (a
    pipeline's last-stage head, ParallelModel.tied_copies): grouped as embeddings."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        if not p.requires_grad:
            continue
        # A last pipeline stage's copy of the tied embedding is still the embedding, so
        # both copies take the same update and stay identical.
        is_embedding = id(p) in embedding_params or name in embedding_copies
        if not _no_decay_by_shape(name, p) and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def decayed_params(model: nn.Module, o: OptimConfig,
                   embedding_copies=()) -> list[nn.Parameter]:
    """The parameters weight decay (and the L1/L2 penalties) apply to."""
    groups = param_groups(model, 1.0, o.decay_embeddings, embedding_copies)
    return [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]


def kernel(o: OptimConfig) -> str:
    """The concrete kernel `o.implementation` means: foreach | fused | for-loop."""
    if o.implementation != "auto":
        return o.implementation
    # adamw8bit's "fused" compiles its update (compile time at start-up): opt-in only.
    return "fused" if o.name in FUSED else "foreach"


def _kernel_kwargs(o: OptimConfig) -> dict:
    if kernel(o) == "fused":
        if o.name not in FUSED:
            raise ConfigError(f"optim.implementation='fused': torch has no fused "
                              f"{o.name}; use 'foreach'")
        return {"fused": True}
    return {"foreach": kernel(o) == "foreach"}


def make_optimizer(groups: list[dict], o: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The `o.name` optimizer over `groups` at peak learning rate `lr`."""
    if o.name == "adamw8bit":  # ours, not torch.optim's (optim/adamw8bit.py)
        return build_adamw8bit(groups, o, lr)
    kw = _kernel_kwargs(o)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum,
                               nesterov=o.nesterov and o.momentum > 0, **kw)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, **kw)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, **kw)
    if o.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=o.eps, **kw)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, eps=o.eps, momentum=o.momentum, **kw)
    raise ValueError(f"unknown optimizer {o.name}")  # config validation prevents this


def build_optimizer(model: nn.Module, o: OptimConfig, *, lr: float | None = None,
                    master_weights: bool = False,
                    embedding_copies=()) -> torch.optim.Optimizer:
    """The optimizer of `o` over `model`'s parameter groups.

    `lr`: the peak LR (default `o.lr`; the trainer passes the batch-scaled one).
    `master_weights`: keep fp32 master copies of low-precision parameters and run the
    optimizer on them (bf16-pure; see optim/master_weights.py).
    `embedding_copies`: see `param_groups`.
    """
    opt = make_optimizer(param_groups(model, o.weight_decay, o.decay_embeddings,
                                      embedding_copies), o, lr or o.lr)
    if master_weights:
        add_master_weights(opt)
    return opt
