"""Activation checkpointing per transformer block: full or selective.

`full`: keep only each block's input and recompute the block in the backward (Chen et
al. 2016) — activation memory per block drops from O(B·T·(34·D + 5·H·T)) bytes to
O(B·T·D) (Korthikanti et al. 2022, §4), at the cost of one extra forward (~33% more
compute). `selective`: save the outputs of the matmuls and attention (expensive to
recompute) and recompute only the cheap element-wise ops (LayerNorm, GELU, dropout,
adds), most of the memory saving for a few per cent of compute (Korthikanti et al.
2022, §5; torchtitan's op-level SAC).

The block's `forward` is replaced (on the instance) by a non-reentrant
`torch.utils.checkpoint.checkpoint` of itself: no wrapper module, so parameter names
(seeded init, checkpoint keys) do not change. (The composable
`torch.distributed._composable.checkpoint` also keeps names, but its hooks put FSDP2's
own hooks inside the checkpointed region, which selective AC then fails to replay:
"profiler._record_function_enter_new ... not found in storage", torch 2.13, bf16.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

MODES = ("none", "full", "selective")


def _save_list() -> set:
    """Ops whose outputs selective AC keeps (the matmuls and attention kernels)."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    return ops


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _save_list()

    def policy(ctx, op, *args, **kwargs):
        return (CheckpointPolicy.MUST_SAVE if op in save
                else CheckpointPolicy.PREFER_RECOMPUTE)

    return create_selective_checkpoint_contexts(policy)


def _checkpointed(forward, context_fn):
    """`forward` run under non-reentrant `torch.utils.checkpoint.checkpoint`."""
    from torch.utils.checkpoint import checkpoint

    from torch.utils.checkpoint import noop_context_fn

    # Pass context_fn only when it is not the default: dynamo (train.compile) cannot
    # trace a context_fn read from a closure ("checkpoint not implemented for
    # LazyVariableTracker context_fn", torch 2.13); the default needs none.
    extra = {} if context_fn is noop_context_fn else {"context_fn": context_fn}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every block of `model.blocks` (`mode`: none | full | selective)."""
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpoint mode {mode!r}; expected {MODES}")
    if mode == "none":
        return model
    from torch.utils.checkpoint import noop_context_fn

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to checkpoint")
    context_fn = _selective_context if mode == "selective" else noop_context_fn
    for block in blocks.values():
        # Only the block's own `forward` is checkpointed: FSDP's per-block hooks
        # (all-gather, reshard, profiler ranges) stay outside the recomputed region, as
        # with torchtitan's checkpoint_wrapper, so selective AC's replay sees exactly the
        # ops it recorded. An instance attribute keeps module structure and names.
        block.forward = _checkpointed(block.forward, context_fn)
    return model
