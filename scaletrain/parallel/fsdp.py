"""FSDP2 (`fully_shard`, ZeRO-3) and HSDP: parameters, gradients and optimizer state
sharded over the `dp_shard` ranks (and replicated over `dp_replicate`).

Each transformer block is its own FSDP unit, then the root (embeddings, final norm,
head) — so only one block's full parameters exist at a time, and the all-gather of
block i+1 overlaps the compute of block i (Zhao et al. 2023, "PyTorch FSDP"; torchtitan
`apply_fsdp`). Parameters become DTensors sharded on dim 0; the optimizer then only
ever sees this rank's shard (ZeRO stage 3, Rajbhandari et al. 2020).

Tied weights: `lm_head.weight is wte.weight` lives in the root unit, which FSDP2
de-duplicates, so the tie survives sharding (tests/distributed check it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from scaletrain.parallel.expert import ExpertParallelExperts


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
               cpu_offload: bool = False, device: torch.device | None = None,
               shard_placement_fn=None, roots: list[nn.Module] | None = None,
               expert_shard_mesh=None) -> nn.Module:
    """Shard `model` over `mesh` in place (1-D: FSDP; 2-D (replicate, shard): HSDP).

    `param_dtype`: the dtype parameters are all-gathered and computed in (bf16 for mixed
    precision); `reduce_dtype`: the dtype gradients are reduce-scattered in (fp32, so
    sums over ranks do not lose bits). `reshard_after_forward=False` keeps each block's
    gathered parameters until its backward (ZeRO-2-like memory, one all-gather less).
    `roots`: modules sharing `model`'s blocks that are each sharded as a root in place of
    `model` (a pipeline rank's stages under the interleaved schedule; model_parallel.py).
    `expert_shard_mesh`: with expert parallelism (parallel/expert.py), the expert mesh's
    "efsdp" dimension — ("dp_replicate", "efsdp") under HSDP — each block's
    expert-parallel experts become their own unit sharded (and replicated) over (under
    TP their DTensors live on the ("ep", "tp") sub-mesh; FSDP2 shards them over efsdp).
    """
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy,
                                        OffloadPolicy, fully_shard)

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory needs an accelerator; on a CPU-only machine pinning fails
    # (DESIGN.md §4 caveat), and offloading is then only a code path check.
    has_accel = device is not None and device.type != "cpu"
    offload = CPUOffloadPolicy(pin_memory=has_accel) if cpu_offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    if shard_placement_fn is not None:  # TP's fused QKV: parallel/tensor.py
        kw["shard_placement_fn"] = shard_placement_fn
    for root in roots or [model]:
        blocks = getattr(root, "blocks", None)
        if blocks is not None:
            units = list(blocks.values())
            for i, block in enumerate(units):
                if expert_shard_mesh is not None:
                    _shard_experts(block, expert_shard_mesh, reshard_after_forward, kw)
                # The last block's parameters are needed again right at the start of the
                # backward, so resharding them after forward only adds an all-gather.
                fully_shard(block, reshard_after_forward=reshard_after_forward
                            and i < len(units) - 1, **kw)
        # FSDP2 never reshards the root after forward (its parameters are used first in
        # the backward), whatever is passed here.
        fully_shard(root, reshard_after_forward=reshard_after_forward, **kw)
    return model


def _shard_experts(block: nn.Module, shard_mesh, reshard: bool, kw: dict) -> None:
    """FSDP2 (HSDP with replicas) over `shard_mesh` for the block's expert-parallel
    experts, before the block's own unit (which then leaves their parameters alone), as
    torchtitan does. FSDP2 averages their gradients over the efsdp (× dp_replicate)
    ranks; parallel/expert.py `ExpertParallelExperts` scales them so that this average
    is the global loss's gradient."""
    from torch.distributed.fsdp import fully_shard

    for m in block.modules():
        if isinstance(m, ExpertParallelExperts):
            fully_shard(m, **{**kw, "mesh": shard_mesh},
                        reshard_after_forward=reshard)


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module):
    """Accumulate unsharded gradients locally; reduce-scatter only on the last backward.

    FSDP2's `set_requires_gradient_sync(False)` keeps full-size gradients between
    micro-batches (memory ~ DDP's) in exchange for one reduce-scatter per step.
    """
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
