"""Sampling a mixture of sources in fixed proportions, world-size independent.

The global sample order is defined position by position: position g of the run (over
all ranks, across steps and epochs) goes to the source that is furthest behind its
share, i.e. argmax_i (w_i·(g+1) − c_i) with c_i the samples source i got before g
(ties: the lower index). This is the deterministic blending of Megatron-LM's
`build_blending_indices` (megatron/core/datasets/helpers.cpp): after any prefix of g
samples every source is at most one sample ahead of its share w_i·g and at most k−1
behind (k sources; tests/unit/test_mixture.py derives and checks the bound), so even
one global batch has the proportions, where a random draw per sample would drift by
~sqrt(w·g). Which sample of source i
comes next is that source's own seeded order, a `GlobalSampler` with stream i (an
independent permutation per epoch of that source; a small source wraps into its next
epoch while a large one is still in its first).

The state is the per-source counts c_i: the position is their sum, each source's
sampler is at divmod(c_i, n_i). A global batch is the next `batch_size` positions, the
same whatever the number of ranks, and `rank_slice` splits it as for a single dataset,
so resume (on any number of ranks) continues the same sequence exactly.
"""

from __future__ import annotations

import numpy as np

from scaletrain.data.datasets import MixtureWindows
from scaletrain.data.sampler import GlobalSampler
from scaletrain.errors import DataError


class MixtureSampler:
    """Global batches of indices into a `MixtureWindows` index space (offset_i + j),
    with source i's share `weights[i]` (normalised) of every prefix of the sequence."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int,
                 shuffle: bool = True, names: list[str] | None = None):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        if min(weights) <= 0:
            raise ValueError(f"mixture weights must be > 0, got {weights}")
        total = float(sum(weights))
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) / total for w in weights]
        self.names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.n = int(sum(self.sizes))  # the index space (the loader's dataset size check)
        self.offsets = np.cumsum([0, *self.sizes]).astype(np.int64)
        self.subs = [GlobalSampler(n, seed, shuffle, stream=i) for i, n in enumerate(sizes)]
        self.counts = [0] * len(sizes)

    def _sources(self, batch_size: int) -> np.ndarray:
        """The source of each of the next `batch_size` positions, advancing `counts`.
        A Python loop: k sources × B positions of float arithmetic, microseconds per
        batch next to the memory-map read."""
        w, c, k = self.weights, self.counts, len(self.weights)
        g = sum(c)
        out = np.empty(batch_size, dtype=np.int64)
        for b in range(batch_size):
            g += 1
            best = max(range(k), key=lambda i: w[i] * g - c[i])  # first maximum
            c[best] += 1
            out[b] = best
        return out

    def next_global(self, batch_size: int) -> np.ndarray:
        """The next `batch_size` global sample indices (int64), advancing the state."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        src = self._sources(batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for i, sub in enumerate(self.subs):
            rows = src == i
            m = int(rows.sum())
            if m:
                out[rows] = sub.next_global(m) + self.offsets[i]
        return out

    def samples_by_source(self) -> dict[str, int]:
        """Samples each source has handed out so far (all ranks together), by name."""
        return dict(zip(self.names, self.counts))

    def clone(self) -> MixtureSampler:
        """A sampler at the same position that advances on its own (the prefetcher's)."""
        twin = MixtureSampler(self.sizes, self.weights, self.seed, self.shuffle, self.names)
        twin.load_state_dict(self.state_dict())
        return twin

    def state_dict(self) -> dict:
        """{'counts', 'sizes', 'weights'}: plain ints and floats (JSON, checkpointable)."""
        return {"counts": list(self.counts), "sizes": list(self.sizes),
                "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the samples `state` counts; refused (DataError) when the
        sources' sizes or the weights differ from the saved run's."""
        if "counts" not in state:
            raise DataError("the loader state is of a single dataset, not of a mixture "
                            "(data.mixture was set after the checkpoint)")
        sizes, weights = [int(n) for n in state["sizes"]], [float(w) for w in state["weights"]]
        if sizes != self.sizes:
            raise DataError(f"the loader state is for mixture sources of {sizes} samples but "
                            f"these have {self.sizes}; the data changed since the checkpoint")
        if not np.allclose(weights, self.weights, rtol=1e-12, atol=0):
            raise DataError(f"the loader state is for mixture weights {weights} but these "
                            f"are {self.weights}")
        counts = [int(c) for c in state["counts"]]
        if len(counts) != len(sizes) or min(counts) < 0:
            raise ValueError(f"mixture sampler state {state} is out of range")
        self.counts = counts
        for sub, c, n in zip(self.subs, counts, sizes):
            epoch, pos = divmod(c, n)
            sub.load_state_dict({"epoch": epoch, "pos": pos})


def make_sampler(dataset, seed: int, shuffle: bool):
    """The sampler a dataset is drawn with: a `MixtureSampler` for a `MixtureWindows`,
    else the single-dataset `GlobalSampler`."""
    if isinstance(dataset, MixtureWindows):
        return MixtureSampler(dataset.sizes, dataset.weights, seed, shuffle, dataset.names)
    return GlobalSampler(len(dataset), seed, shuffle)


def tokens_by_source(sampler, seq_len: int) -> dict[str, int] | None:
    """Training tokens (targets) seen per source, cumulative over the run: every window
    of a `TokenWindows` has `seq_len` targets. None when `sampler` is not a mixture's."""
    if not isinstance(sampler, MixtureSampler):
        return None
    return {name: c * seq_len for name, c in sampler.samples_by_source().items()}
