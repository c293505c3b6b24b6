"""Checkpoint tensors of tensor-parallel models in a layout DCP can write and read.

The fused QKV weight is sharded with `_StridedShard` (parallel/tensor.py): rank r holds
the three row blocks Q_r, K_r, V_r — three chunks of the global tensor, but DCP describes
each rank's part of a tensor as one contiguous chunk (offsets + sizes) and refuses the
plan ("overlapping chunks"). Before saving, such tensors (parameters and their optimizer
state) are redistributed to the plain `Shard` of the same dimension (one all-to-all at
checkpoint time, done by DTensor); the files then hold the ordinary global (3D, D) matrix
that any other layout, a single process included, reads. After loading, the optimizer's
state is brought back to its parameters' placements. Both are no-ops for other models.
"""

from __future__ import annotations

import torch


def _plain(placements):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in placements]


def _is_strided(t) -> bool:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(t, DTensor) and any(isinstance(p, _StridedShard) for p in t.placements)


def savable(state):
    """A copy of the nested state dict with strided DTensors as plain-sharded ones (other
    values are the same objects, so DCP can still load into them in place)."""
    if isinstance(state, dict):
        return {k: savable(v) for k, v in state.items()}
    if isinstance(state, list):
        return [savable(v) for v in state]
    if _is_strided(state):
        return state.detach().redistribute(state.device_mesh, _plain(state.placements))
    return state


@torch.no_grad()
def restore_layout(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state tensors to their parameter's placements (after a load replaced
    them by plain-sharded ones), so the update's foreach kernels see one layout."""
    from torch.distributed.tensor import DTensor

    for p, st in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for k, v in st.items():
            if isinstance(v, DTensor) and v.shape == p.shape and \
                    tuple(v.placements) != tuple(p.placements):
                st[k] = v.redistribute(p.device_mesh, p.placements)
