"""Optimizers from `torch.optim`, with weight decay only where it belongs.

Decay applies to >=2-D weights (matrices, conv kernels); never to biases or norm scales,
and to embedding tables only if `optim.decay_embeddings` (nanoGPT/GPT-3 practice).
For AdamW the decay is decoupled (Loshchilov & Hutter 2019); for the others it is the
classic L2 term added to the gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scaletrain.config.schema import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embedding_params
        if p.dim() >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, o.weight_decay, o.decay_embeddings)
    # foreach kernels batch the per-parameter updates (fewer launches); fused exists for
    # Adam/AdamW/SGD on CPU and CUDA but not for every dtype, so stay with foreach.
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum,
                               nesterov=o.nesterov and o.momentum > 0, foreach=True)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                foreach=True)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 foreach=True)
    if o.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=o.lr, eps=o.eps, foreach=True)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=o.lr, eps=o.eps, momentum=o.momentum,
                                   foreach=True)
    raise ValueError(f"unknown optimizer {o.name}")  # config validation prevents this
