"""Named sub-meshes and groups of the world mesh built by `ParallelDims.build_mesh`.

The world mesh has the dimensions ("pp", "dp_replicate", "dp_shard", "tp") from outermost
to innermost, size-1 ones dropped (torchtitan's order: TP, which communicates inside every
layer, on neighbouring ranks — the same node/NVLink domain; PP, which sends one activation
per micro-batch, outermost, across nodes). These helpers answer "which ranks share my X"
whatever subset of dimensions exists; None means a degree of 1 (no communication).
"""

from __future__ import annotations


def _names(mesh) -> tuple[str, ...]:
    return tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()


def sub(mesh, *names: str):
    """The sub-mesh over the existing dimensions among `names` (None if none exist)."""
    have = [n for n in names if n in _names(mesh)]
    if not have:
        return None
    if len(have) == 1:
        return mesh[have[0]]
    return mesh[tuple(have)]


def dp_mesh(mesh):
    """1-D mesh of the data-parallel ranks (dp_replicate × dp_shard flattened), or None."""
    have = [n for n in ("dp_replicate", "dp_shard") if n in _names(mesh)]
    if not have:
        return None
    if len(have) == 1:
        return mesh[have[0]]
    return mesh[tuple(have)]._flatten("dp")


def group(m):
    """The process group of a 1-D mesh (None for None)."""
    return None if m is None else m.get_group()


def coordinate(mesh, name: str) -> int:
    """This rank's index along dimension `name` (0 when the dimension does not exist)."""
    if name not in _names(mesh):
        return 0
    return mesh[name].get_local_rank()


def dp_rank(mesh, dims) -> int:
    """This rank's index among the data-parallel ranks (which slice of the batch it reads)."""
    return coordinate(mesh, "dp_replicate") * dims.dp_shard + coordinate(mesh, "dp_shard")
