"""Activation checkpointing per transformer block: full or selective.

`full`: keep only each block's input and recompute the block in the backward (Chen et
al. 2016) — activation memory per block drops from O(B·T·(34·D + 5·H·T)) bytes to
O(B·T·D) (Korthikanti et al. 2022, §4), at the cost of one extra forward (~33% more
compute). `selective`: save the outputs of the matmuls and attention (expensive to
recompute) and recompute only the cheap element-wise ops (LayerNorm, GELU, dropout,
adds), most of the memory saving for a few per cent of compute (Korthikanti et al.
2022, §5; torchtitan's op-level SAC).

Uses the composable `torch.distributed._composable.checkpoint`, which installs hooks
instead of wrapping the module, so parameter names (seeded init, checkpoint keys) do
not change.
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


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every block of `model.blocks` (`mode`: none | full | selective)."""
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpoint mode {mode!r}; expected {MODES}")
    if mode == "none":
        return model
    from torch.distributed._composable import checkpoint

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to checkpoint")
    for block in blocks.values():
        if mode == "full":
            checkpoint(block)
        else:
            checkpoint(block, context_fn=functools.partial(_selective_context))
    return model
