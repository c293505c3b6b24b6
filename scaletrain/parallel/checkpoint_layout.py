"""Checkpoint tensors of tensor-parallel models in a layout DCP can write and read.

The fused QKV weight is sharded with `_StridedShard` (parallel/tensor.py): rank r holds
the three row blocks Q_r, K_r, V_r — three chunks of the global tensor, but DCP describes
each rank's part of a tensor as one contiguous chunk (offsets + sizes) and refuses the
plan ("overlapping chunks"). Before saving, such tensors (parameters and their optimizer
state) are redistributed to the plain `Shard` of the same dimension (one all-to-all at
checkpoint time, done by DTensor); the files then hold the ordinary global (3D, D) matrix
that any other layout, a single process included, reads. After loading, the optimizer's
state is brought back to its parameters' placements. Both are no-ops for other models.

Tied embeddings under pipeline parallelism: one process has a single tensor for
`wte.weight` and `lm_head.weight`, so its flattened optimizer state names only
`state.wte.weight.*`; a pipeline's last stage holds its own copy as `lm_head.weight`
(parallel/pipeline_step.py) whose optimizer entries exist in no other layout's files.
The copy is kept identical to the embedding, so on load it reads the embedding's entries
(`tied_load_names`), which every layout writes; its own are still saved (unused extras).
Which parameters are such copies is a fact of the build (`ParallelModel.tied_copies`,
parallel/parallelize.py), handed to the checkpoint manager.
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


def _rename(state, prefixes: dict[str, str]):
    """Copy of nested dicts with keys starting with a `prefixes` key renamed (values are
    the same objects, so DCP still loads tensors in place)."""
    if not isinstance(state, dict):
        return state
    out = {}
    for k, v in state.items():
        for a, b in prefixes.items():
            if isinstance(k, str) and k.startswith(a):
                k = b + k[len(a):]
                break
        if k in out:
            raise RuntimeError(f"checkpoint key {k!r} is both a tied copy and its source")
        out[k] = _rename(v, prefixes)
    return out


def tied_load_names(state, aliases: dict[str, str]):
    """`state` (flattened optimizer keys, at any depth) with the tied copies' optimizer
    entries ("state.lm_head.weight.exp_avg", "param_groups.lm_head.weight.lr") renamed to
    their source's; `tied_own_names` undoes it after `dcp.load` (which replaces
    non-tensor values such as the learning rate in the dict it was given)."""
    return _rename(state, _prefixes(aliases))


def tied_own_names(state, aliases: dict[str, str]):
    """The inverse of `tied_load_names`."""
    return _rename(state, {b: a for a, b in _prefixes(aliases).items()})


def _prefixes(aliases: dict[str, str]) -> dict[str, str]:
    return {f"{kind}.{a}.": f"{kind}.{b}." for a, b in aliases.items()
            for kind in ("state", "param_groups")}
