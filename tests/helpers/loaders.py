"""Loader-level helpers: a dataset of sample numbers, and global batches rebuilt from the
ranks' parts (tests of the sampler / mixture order across world sizes)."""

from __future__ import annotations

import numpy as np

from scaletrain.data.loader import StatefulLoader


class Indices:
    """A dataset whose sample i is the number i (so batches show which samples they hold)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, idx):
        return np.asarray(idx), None


def global_batches(loaders: list[StatefulLoader], steps: int) -> list[list[int]]:
    """`steps` global batches, each rebuilt in global order from the ranks' parts."""
    out = []
    for _ in range(steps):
        parts = [ld.next()[0] for ld in loaders]
        order = np.empty(sum(len(p) for p in parts), dtype=np.int64)
        world = len(parts)
        for r, p in enumerate(parts):
            if loaders[r].assignment == "block":
                order[r * len(p):(r + 1) * len(p)] = p
            else:  # strided: rank r holds global positions r, r + world, ...
                order[r::world] = p
        out.append(order.tolist())
    return out
