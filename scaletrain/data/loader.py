"""A resumable batch loader over a `GlobalSampler`, with optional background prefetch.

Why not `torch.utils.data.DataLoader` / `torchdata.StatefulDataLoader`: batches here are
one fancy-indexing call on a memory map (microseconds to a millisecond), so worker
*processes* cost more than they save, and the order must come from the world-size-
independent `GlobalSampler`. What remains is a few threads that overlap that call with
the step, and a state that counts batches the *caller* consumed — not the ones
prefetched — so that a checkpoint taken at step k resumes at batch k+1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from scaletrain.data.mixture import MixtureSampler, make_sampler
from scaletrain.data.sampler import GlobalSampler, rank_slice
from scaletrain.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


class StatefulLoader:
    """This rank's part of each global batch of `batch_size` samples, in a seeded order.

    `batch_size` is the *global* batch (all ranks together); each rank gets
    `batch_size // world` samples per `next()`. `workers` > 0 prefetches up to
    2*workers batches in that many threads; the batches and the state are the same as
    with `workers=0`.
    """

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int, shuffle: bool = True, assignment: str = "block",
                 workers: int = 0):
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} does not divide over {world} ranks")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.rank, self.world, self.assignment = rank, world, assignment
        # The consumed position; a mixture's dataset is drawn per source (data/mixture.py).
        self.sampler = make_sampler(dataset, seed, shuffle)
        self.workers = int(workers)
        self._pool = ThreadPoolExecutor(workers, "prefetch") if workers > 0 else None
        self._ahead: GlobalSampler | MixtureSampler | None = None  # producer position, when prefetching
        self._queue: deque[Future] = deque()

    def _indices(self, sampler: GlobalSampler | MixtureSampler) -> np.ndarray:
        return rank_slice(sampler.next_global(self.batch_size), self.rank, self.world,
                          self.assignment)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        """The next batch: never ends (epochs follow each other)."""
        if self._pool is None:
            return self.dataset.batch(self._indices(self.sampler))
        if self._ahead is None:
            self._ahead = self.sampler.clone()
        while len(self._queue) < 2 * self.workers:
            self._queue.append(self._pool.submit(self.dataset.batch,
                                                 self._indices(self._ahead)))
        batch = self._queue.popleft().result()
        # Advance the consumed position by exactly one batch (index arithmetic only).
        self.sampler.next_global(self.batch_size)
        return batch

    next = __next__

    def set_batch_size(self, batch_size: int) -> None:
        """The global batch of the next `next()` (a batch ramp or descent mode sizes each
        step's): batches prefetched at the old size are dropped and drawn again from the
        consumed position, so the batches stay those of `workers=0`."""
        if batch_size == self.batch_size:
            return
        if batch_size % self.world:
            raise ValueError(f"global batch {batch_size} does not divide over "
                             f"{self.world} ranks")
        self.batch_size = int(batch_size)
        self._reset_prefetch()

    def state_dict(self) -> dict:
        """Position after the batches returned so far: {'epoch', 'pos', 'n'} (plain ints;
        a mixture's: {'counts', 'sizes', 'weights', 'n'})."""
        return {**self.sampler.state_dict(), "n": self.sampler.n}

    def load_state_dict(self, state: dict) -> None:
        """Resume after the batches `state` counts; prefetched batches are dropped."""
        n = int(state.get("n", self.sampler.n))
        if n != self.sampler.n:
            raise DataError(f"the loader state is for a dataset of {n} samples but this "
                            f"one has {self.sampler.n}; the data changed since the checkpoint")
        self.sampler.load_state_dict(state)
        self._reset_prefetch()

    def _reset_prefetch(self) -> None:
        for f in self._queue:
            f.cancel()
        self._queue.clear()
        self._ahead = None

    def close(self) -> None:
        """Stop the prefetch threads (idempotent)."""
        self._reset_prefetch()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> StatefulLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eval_batches(dataset, batch_size: int, max_batches: int, rank: int = 0,
                 world: int = 1) -> Iterator[Batch]:
    """Fixed evaluation batches: the first `max_batches` (all if <= 0) sequential
    global batches of `batch_size` samples, this rank's part of each.

    The same samples are evaluated at every evaluation and for every world size. The
    last global batch may be smaller and need not divide over the ranks: it is split
    into near-equal contiguous parts, so a rank can get an empty batch (B = 0). Every
    rank still yields the same number of batches, so collectives inside the loop match;
    average with a global sum of losses over a global count of targets, not a mean of
    per-batch means.
    """
    n = len(dataset)
    n_batches = -(-n // batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        idx = np.arange(b * batch_size, min((b + 1) * batch_size, n), dtype=np.int64)
        yield dataset.batch(np.array_split(idx, world)[rank])
