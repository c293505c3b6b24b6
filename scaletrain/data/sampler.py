"""One global, seeded sample order, independent of the number of ranks.

`torch.utils.data.DistributedSampler` shuffles and then pads/strides per rank, so the
samples that make up global batch k depend on the world size, and resuming on a
different number of ranks changes the data. Here the order is defined for the *global*
batch only (a permutation per epoch from `default_rng([seed, epoch])`), and each rank
takes its part of each global batch with `rank_slice`. Hence: the union over ranks of
global batch k is the same set for world 1, 2 or 8, a run's data does not change when
it is resumed on another world size, and the state is two integers.
"""

from __future__ import annotations

import numpy as np

ASSIGNMENTS = ("block", "strided")


class GlobalSampler:
    """Yields global batches of sample indices; epochs follow each other without gaps.

    State: `epoch` (0-based) and `pos`, the samples of that epoch already handed out. A
    batch that runs past the end of an epoch continues with the start of the next one
    (a new permutation), so no sample is dropped and every batch is full.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, stream: int | None = None):
        """`stream`: an independent order for the same seed (a mixture's source i uses
        stream i); None is the order of a single dataset, as before streams existed."""
        if n <= 0:
            raise ValueError(f"cannot sample from an empty dataset (n={n})")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.stream = stream
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch` (cached for the current one)."""
        if epoch != self._order_epoch:
            if self.shuffle:
                # A seed sequence of (seed, epoch): independent streams per epoch, and
                # epoch e's order is computable without replaying epochs 0..e-1.
                key = [self.seed, epoch] if self.stream is None else \
                    [self.seed, self.stream, epoch]
                self._order = np.random.default_rng(key).permutation(self.n)
            else:
                self._order = np.arange(self.n, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def next_global(self, batch_size: int) -> np.ndarray:
        """The next `batch_size` global sample indices (int64), advancing the state."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        parts = []
        need = batch_size
        while need:
            take = self.order(self.epoch)[self.pos:self.pos + need]
            parts.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(parts).astype(np.int64, copy=False)

    def clone(self) -> GlobalSampler:
        """A sampler at the same position that advances on its own (the prefetcher's)."""
        twin = GlobalSampler(self.n, self.seed, self.shuffle, self.stream)
        twin.load_state_dict(self.state_dict())
        return twin

    def state_dict(self) -> dict[str, int]:
        """{'epoch', 'pos'} as plain ints (checkpointable)."""
        return {"epoch": int(self.epoch), "pos": int(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the same seed and n give the same continuation."""
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos < self.n:
            raise ValueError(f"sampler state {state} is out of range for n={self.n}")
        self.epoch, self.pos = epoch, pos


def rank_slice(global_idx: np.ndarray, rank: int, world: int,
               assignment: str = "block") -> np.ndarray:
    """This rank's part of a global batch.

    'block': contiguous equal chunks (rank r gets [r*B/W, (r+1)*B/W)) — each rank reads a
    contiguous run of the global order. 'strided': every world-th sample from `rank` on.
    Either way the union over ranks is exactly `global_idx`. The global batch must divide
    evenly, so every rank does the same amount of work per step.
    """
    n = len(global_idx)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if n % world:
        raise ValueError(f"a global batch of {n} samples does not divide over {world} ranks")
    if assignment == "block":
        per = n // world
        return global_idx[rank * per:(rank + 1) * per]
    if assignment == "strided":
        return global_idx[rank::world]
    raise ValueError(f"unknown assignment {assignment!r}; expected one of {ASSIGNMENTS}")
