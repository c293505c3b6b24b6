"""The mixture sampler and dataset (data/mixture.py, data/datasets.py MixtureWindows):
proportions, per-source orders, world-size independence, exact resume, state checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaletrain.data.datasets import MixtureWindows, TokenWindows
from scaletrain.data.loader import StatefulLoader
from scaletrain.data.mixture import MixtureSampler, tokens_by_source
from scaletrain.data.sampler import GlobalSampler
from scaletrain.errors import DataError
from tests.helpers.loaders import Indices, global_batches


def mixture_of(sizes, weights, names=None) -> MixtureWindows:
    """A MixtureWindows over index datasets (its batch() returns global indices)."""
    mix = MixtureWindows.__new__(MixtureWindows)  # no token files: only the index space
    total = float(sum(weights))
    mix.parts, mix.names = [Indices(n) for n in sizes], names or [f"s{i}" for i in range(len(sizes))]
    mix.weights, mix.sizes = [w / total for w in weights], list(sizes)
    mix.offsets = np.cumsum([0, *sizes]).astype(np.int64)
    mix.batch = lambda idx: (np.asarray(idx), None)
    return mix


@pytest.mark.parametrize("trial", range(20))
def test_every_prefix_has_the_weights_to_within_a_sample_or_so(trial):
    """For every source i and every prefix of g samples (20,000 of them), the count c_i(g)
    and the share w_i·g satisfy -(k-1) <= c_i - w_i·g <= 1, a bound that follows from the
    rule: a source is picked only when its deficit w_i·g - c_i is the largest, hence >= 0
    (the deficits sum to 0), so a pick leaves it at most 1 ahead; and as no source is
    more than 1 ahead and the errors sum to 0, none is more than k-1 behind. (Measured on
    these weights: +0.80 / -1.13.) A random draw per sample would be off by ~sqrt(w·g),
    tens of samples here."""
    rng = np.random.default_rng(trial)
    k = int(rng.integers(2, 7))
    w = rng.random(k) ** 3 + 1e-3  # some sources far smaller than others
    s = MixtureSampler([101] * k, list(w), seed=trial)
    picks = (s.next_global(20000) // 101)  # equal sizes: the source is index // 101
    counts = np.cumsum(np.eye(k, dtype=np.int64)[picks], axis=0)
    err = counts - np.outer(np.arange(1, 20001), s.weights)
    assert err.max() <= 1.0 + 1e-9 and err.min() >= -(k - 1) - 1e-9
    assert np.abs(err[-1]).max() < 1.5  # and over the whole run: the proportions
    assert s.counts == counts[-1].tolist()


def test_each_source_follows_its_own_seeded_order_through_epochs():
    sizes, weights = [7, 50, 13], [0.5, 0.3, 0.2]
    s = MixtureSampler(sizes, weights, seed=3)
    idx = np.concatenate([s.next_global(b) for b in (5, 17, 64, 3, 111)])
    offsets = np.cumsum([0, *sizes])
    for i, n in enumerate(sizes):
        mine = idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - offsets[i]
        ref = GlobalSampler(n, 3, stream=i)
        assert mine.tolist() == ref.next_global(len(mine)).tolist()
        full = len(mine) // n
        for e in range(full):  # every sample exactly once per epoch of that source
            assert sorted(mine[e * n:(e + 1) * n].tolist()) == list(range(n))
    # Streams are independent: equal-sized sources do not share one permutation.
    a, b = GlobalSampler(50, 3, stream=0), GlobalSampler(50, 3, stream=1)
    assert a.order(0).tolist() != b.order(0).tolist()


def test_seed_changes_the_order_but_not_the_proportions():
    a = MixtureSampler([40, 40], [1, 3], seed=1).next_global(64)
    b = MixtureSampler([40, 40], [1, 3], seed=2).next_global(64)
    assert a.tolist() != b.tolist()
    assert ((a >= 40).sum(), (b >= 40).sum()) == (48, 48)


@pytest.mark.parametrize("saved_world,resumed_world", [(1, 2), (2, 1), (4, 2)])
def test_resume_on_another_world_size_continues_the_same_sequence(saved_world, resumed_world):
    mix = mixture_of([23, 61, 9], [0.2, 0.5, 0.3])

    def ranks(world, state=None, workers=0):
        out = [StatefulLoader(mix, 8, rank=r, world=world, seed=5, workers=workers)
               for r in range(world)]
        for ld in out:
            if state is not None:
                ld.load_state_dict(state)
        return out

    reference = global_batches(ranks(1), 30)
    assert global_batches(ranks(saved_world), 30) == reference  # world-size independent
    first = ranks(saved_world, workers=2)  # prefetch must not leak into the state
    head = global_batches(first, 12)
    states = [ld.state_dict() for ld in first]
    assert all(st == states[0] for st in states)
    resumed = ranks(resumed_world, states[0], workers=2)  # prefetch from a loaded state
    tail = global_batches(resumed, 18)
    assert head + tail == reference
    for ld in first + resumed:
        ld.close()


def test_state_of_other_data_is_refused():
    s = MixtureSampler([10, 20], [1, 1], seed=0)
    s.next_global(7)
    state = s.state_dict()
    with pytest.raises(DataError, match="changed since the checkpoint"):
        MixtureSampler([10, 21], [1, 1], seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="mixture weights"):
        MixtureSampler([10, 20], [1, 2], seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="not of a mixture"):
        MixtureSampler([10, 20], [1, 1], seed=0).load_state_dict({"epoch": 0, "pos": 3})
    twin = MixtureSampler([10, 20], [1, 1], seed=0)
    twin.load_state_dict(state)
    assert twin.next_global(9).tolist() == s.next_global(9).tolist()


def test_tokens_by_source_counts_seq_len_targets_per_sample():
    s = MixtureSampler([10, 20], [3, 1], seed=0, names=["a", "b"])
    s.next_global(8)
    assert tokens_by_source(s, 32) == {"a": 6 * 32, "b": 2 * 32}
    assert tokens_by_source(GlobalSampler(10, 0), 32) is None


def test_mixture_windows_batch_equals_the_sources_own_batches(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate((100, 257)):
        p = tmp_path / f"{i}.bin"
        rng.integers(0, 300, n).astype("<u2").tofile(p)
        paths.append(p)
    parts = [TokenWindows(p, "uint16", 8) for p in paths]
    mix = MixtureWindows(parts, ["a", "b"], [1.0, 3.0])
    assert len(mix) == len(parts[0]) + len(parts[1]) and mix.weights == [0.25, 0.75]
    idx = np.array([14, 0, 3, 40, 12, 13, 2])  # len(parts[0]) == 12: 12.. is source b
    x, y = mix.batch(idx)
    for row, g in enumerate(idx):
        src, j = (0, g) if g < 12 else (1, g - 12)
        xr, yr = parts[src][int(j)]
        assert torch.equal(x[row], xr) and torch.equal(y[row], yr)
    with pytest.raises(IndexError):
        mix.batch(np.array([len(mix)]))
