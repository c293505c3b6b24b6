"""Activation checkpointing per transformer block: full, selective, every k-th block, or
the least recomputation that fits a memory budget.

`full`: keep only each block's input and recompute the block in the backward (Chen et
al. 2016) — activation memory per block drops from O(B·T·(34·D + 5·H·T)) bytes to
O(B·T·D) (Korthikanti et al. 2022, §4), at the cost of one extra forward (~33% more
compute). `selective`: save the outputs of the matmuls and attention (expensive to
recompute) and recompute only the cheap element-wise ops (LayerNorm, GELU, dropout,
adds), most of the memory saving for a few per cent of compute (Korthikanti et al.
2022, §5; torchtitan's op-level SAC).

Which blocks (`ACPolicy`, `block_modes`): `every = k` checkpoints blocks 0, k, 2k, ...
(torchtitan's layer-frequency AC) — memory and recompute both scale by ~1/k. `budget`
mode mixes none / selective / full per block: the fewest recomputed FLOPs (selective
costs ~0.05 of a block's forward+backward, full ~1/3; plan/fit.py) such that the
activations the rank's blocks keep for the backward fit `budget_bytes`, from the plan's
per-block byte model (plan/memory.py `ac_policy`). The earliest blocks are checkpointed
first: their activations are the last freed in the backward.

The block's `forward` is replaced (on the instance) by a non-reentrant
`torch.utils.checkpoint.checkpoint` of itself: no wrapper module, so parameter names
(seeded init, checkpoint keys) do not change. (The composable
`torch.distributed._composable.checkpoint` also keeps names, but its hooks put FSDP2's
own hooks inside the checkpointed region, which selective AC then fails to replay:
"profiler._record_function_enter_new ... not found in storage", torch 2.13, bf16.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from scaletrain.errors import ConfigError

MODES = ("none", "full", "selective", "budget")
BLOCK_MODES = ("none", "selective", "full")
# Recompute per checkpointed block, as a fraction of its forward + backward (the sources
# are in plan/fit.py's doc; its search and the budget mode both price AC with these).
RECOMPUTE_COST = {"none": 0.0, "selective": 0.05, "full": 1 / 3}


class BudgetTooSmall(ConfigError):
    """The budget is below what checkpointing every block keeps."""


@dataclass(frozen=True)
class ACPolicy:
    mode: str = "none"  # MODES
    every: int = 1  # full / selective: every k-th block
    budget_bytes: float = 0.0  # budget: activation bytes the rank's blocks may keep
    # budget: bytes one block keeps per micro-batch under none / selective / full
    block_bytes: dict = field(default_factory=dict)


def block_modes(policy: ACPolicy | str, n: int) -> list[str]:
    """The AC mode of each of `n` blocks (in order) under `policy`."""
    if isinstance(policy, str):
        policy = ACPolicy(policy)
    if policy.mode not in MODES:
        raise ValueError(f"unknown activation checkpoint mode {policy.mode!r}; "
                         f"expected {MODES}")
    if policy.mode == "none" or n == 0:
        return ["none"] * n
    if policy.mode != "budget":
        return [policy.mode if i % policy.every == 0 else "none" for i in range(n)]
    return _budget_modes(policy.block_bytes, policy.budget_bytes, n)


def describe(modes: list[str]) -> str:
    """'full x2, selective x1, none x3' (block order: that of the list)."""
    return ", ".join(f"{m} x{modes.count(m)}" for m in BLOCK_MODES[::-1] if m in modes)


def kept_bytes(modes: list[str], block_bytes: dict) -> float:
    """Bytes the blocks keep at the start of the backward: each block's kept share, plus
    one block's full activations while a checkpointed block is recomputed."""
    kept = sum(block_bytes[m] for m in modes)
    return kept + (block_bytes["none"] if any(m != "none" for m in modes) else 0.0)


def _budget_modes(block_bytes: dict, budget: float, n: int) -> list[str]:
    best = None
    for n_full in range(n + 1):
        for n_sel in range(n - n_full + 1):
            modes = ["full"] * n_full + ["selective"] * n_sel + ["none"] * (n - n_full - n_sel)
            if kept_bytes(modes, block_bytes) > budget:
                continue
            cost = n_full * RECOMPUTE_COST["full"] + n_sel * RECOMPUTE_COST["selective"]
            if best is None or cost < best[0]:
                best = (cost, modes)
    if best is None:
        need = kept_bytes(["full"] * n, block_bytes)
        raise BudgetTooSmall(f"the activation budget {budget / 2**30:.3g} GiB is below "
                             f"{need / 2**30:.3g} GiB, what {n} fully checkpointed blocks "
                             f"keep at this micro-batch")
    return best[1]


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
    from torch.utils.checkpoint import (SAC_IGNORED_OPS, CheckpointPolicy,
                                        create_selective_checkpoint_contexts)

    # Selective AC replays the forward's ops by per-op invocation index. Profiler
    # annotations are no computation, and an FSDP2 unit *inside* the checkpointed block
    # (expert parallelism's experts, parallel/fsdp.py `_shard_experts`) opens a different
    # number of them in the recompute than in the forward (its all-gather was prefetched
    # by the block's pre-backward): "profiler._record_function_enter_new ... not found in
    # storage", torch 2.13 (torchtitan #3427; NeMo Automodel adds the same ops to torch's
    # public ignore set). Idempotent: a set update.
    profiler = torch.ops.profiler
    SAC_IGNORED_OPS.update({profiler._record_function_enter.default,
                            profiler._record_function_enter_new.default,
                            profiler._record_function_exit.default,
                            profiler._record_function_exit._RecordFunction})
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


def apply_ac(model: nn.Module, policy: ACPolicy | str) -> list[str]:
    """Checkpoint the blocks of `model.blocks` per `policy` (a mode name: every block);
    returns the mode of each block present on this rank (a pipeline stage drops the
    others)."""
    from torch.utils.checkpoint import noop_context_fn

    mode = policy if isinstance(policy, str) else policy.mode
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpoint mode {mode!r}; expected {MODES}")
    if mode == "none":
        return []
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to checkpoint")
    present = [b for b in blocks.values() if b is not None]
    modes = block_modes(policy, len(present))
    for block, m in zip(present, modes):
        if m == "none":
            continue
        context_fn = _selective_context if m == "selective" else noop_context_fn
        # Only the block's own `forward` is checkpointed: FSDP's per-block hooks
        # (all-gather, reshard, profiler ranges) stay outside the recomputed region, as
        # with torchtitan's checkpoint_wrapper, so selective AC's replay sees exactly the
        # ops it recorded. An instance attribute keeps module structure and names.
        block.forward = _checkpointed(block.forward, context_fn)
    return modes
