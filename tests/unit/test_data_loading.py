"""Datasets, the global sampler and the stateful loader: shapes, order, resume, ranks."""

from __future__ import annotations

import numpy as np
import pytest

from scaletrain.data.datasets import ArrayDataset, TokenWindows
from scaletrain.data.loader import StatefulLoader, eval_batches
from scaletrain.data.sampler import GlobalSampler, rank_slice
from scaletrain.errors import DataError


@pytest.fixture
def windows(tmp_path):
    """A token file 0, 1, ..., 100 (101 tokens) as windows of 10: 10 samples."""
    np.arange(101, dtype="<u2").tofile(tmp_path / "train.bin")
    return TokenWindows(tmp_path / "train.bin", "uint16", 10)


def test_token_windows_shift_by_one(windows):
    assert len(windows) == 10 and windows.n_tokens == 101
    x, y = windows.batch(np.array([3, 0, 9]))
    assert x.shape == y.shape == (3, 10) and str(x.dtype) == "torch.int64"
    assert x[0].tolist() == list(range(30, 40)) and y[0].tolist() == list(range(31, 41))
    assert (y == x + 1).all() and x.is_contiguous() and y.is_contiguous()
    assert y[2, -1].item() == 100  # the last window reaches the final token
    xi, yi = windows[9]
    assert xi.tolist() == x[2].tolist() and yi.tolist() == y[2].tolist()
    with pytest.raises(IndexError):
        windows.batch(np.array([10]))


def test_token_windows_too_short_names_split_and_seq_len(tmp_path):
    np.zeros(812, dtype="<u4").tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match=rf"^val split of {tmp_path} has 812 tokens, "
                                        rf"fewer than seq_len\+1=1025$"):
        TokenWindows(tmp_path / "val.bin", "uint32", 1024)
    (tmp_path / "odd.bin").write_bytes(b"\0\0\0")
    with pytest.raises(DataError, match="odd.bin: size 3 is not a multiple"):
        TokenWindows(tmp_path / "odd.bin", "uint16", 1)


def test_array_dataset():
    x = np.random.default_rng(0).normal(size=(7, 1, 8, 8))
    ds = ArrayDataset(x, np.arange(7))
    xb, yb = ds.batch(np.array([6, 1]))
    assert len(ds) == 7 and xb.shape == (2, 1, 8, 8) and str(xb.dtype) == "torch.float32"
    assert yb.tolist() == [6, 1] and str(yb.dtype) == "torch.int64"


def test_sampler_epochs_are_permutations_and_wrap():
    s = GlobalSampler(10, seed=3)
    batches = [s.next_global(4) for _ in range(5)]  # 20 samples = exactly 2 epochs
    flat = np.concatenate(batches)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # a new order each epoch
    assert s.state_dict() == {"epoch": 2, "pos": 0}
    assert batches[2].tolist() == flat[8:12].tolist()  # crosses the epoch boundary
    assert GlobalSampler(10, seed=3).next_global(25)[:20].tolist() == flat.tolist()
    plain = GlobalSampler(5, seed=3, shuffle=False)
    assert plain.next_global(7).tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert GlobalSampler(10, seed=4).next_global(10).tolist() != flat[:10].tolist()


def test_sampler_resume_continues_identically():
    a = GlobalSampler(13, seed=7)
    for _ in range(5):
        a.next_global(4)
    state = a.state_dict()
    assert state == {"epoch": 1, "pos": 7}
    b = GlobalSampler(13, seed=7)
    b.load_state_dict(state)
    for _ in range(6):
        assert a.next_global(4).tolist() == b.next_global(4).tolist()


@pytest.mark.parametrize("assignment", ["block", "strided"])
def test_rank_slices_union_is_the_global_batch_for_any_world(assignment):
    reference = GlobalSampler(50, seed=1)
    for _ in range(4):
        g = reference.next_global(8)
        for world in (1, 2, 4):
            parts = [rank_slice(g, r, world, assignment) for r in range(world)]
            assert all(len(p) == 8 // world for p in parts)
            assert sorted(np.concatenate(parts).tolist()) == sorted(g.tolist())
            if world == 1:
                assert parts[0].tolist() == g.tolist()
    g = np.arange(8)
    assert rank_slice(g, 1, 2, "block").tolist() == [4, 5, 6, 7]
    assert rank_slice(g, 1, 2, "strided").tolist() == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="does not divide"):
        rank_slice(np.arange(6), 0, 4)


def _take(loader, k):
    return [tuple(t.tolist() for t in loader.next()) for _ in range(k)]


@pytest.mark.parametrize("world, assignment", [(1, "block"), (2, "strided")])
def test_loader_prefetch_changes_neither_batches_nor_state(windows, world, assignment):
    kw = {"rank": world - 1, "world": world, "seed": 5, "assignment": assignment}
    plain = StatefulLoader(windows, 4, **kw)
    with StatefulLoader(windows, 4, workers=2, **kw) as fetching:
        for k in (1, 3, 7):  # 11 batches of 4 from 10 samples: several epochs
            assert _take(fetching, k) == _take(plain, k)
            assert fetching.state_dict() == plain.state_dict()
        assert plain.state_dict() == {"epoch": 4, "pos": 4, "n": 10}
        # Resume a prefetching loader from a state: its queue is rebuilt from there.
        state = plain.state_dict()
        expected = _take(plain, 5)
        fetching.load_state_dict({"epoch": 0, "pos": 0, "n": 10})
        _take(fetching, 2)
        fetching.load_state_dict(state)
        assert _take(fetching, 5) == expected
    fresh = StatefulLoader(windows, 4, **kw)
    fresh.load_state_dict(state)
    assert _take(fresh, 5) == expected
    with pytest.raises(DataError, match="12 samples but this one has 10"):
        fresh.load_state_dict({"epoch": 0, "pos": 0, "n": 12})


def test_a_resized_prefetching_loader_reads_the_batches_of_a_plain_one(windows):
    """A batch ramp resizes the loader between steps (Trainer.next_micro_batches): batches
    prefetched at the old size must not be served after it; the state stays the same."""
    plain = StatefulLoader(windows, 2, seed=3)
    with StatefulLoader(windows, 2, workers=2, seed=3) as fetching:
        for size, k in ((2, 2), (4, 3), (6, 2), (2, 1)):
            plain.set_batch_size(size)
            fetching.set_batch_size(size)
            got = _take(fetching, k)
            assert got == _take(plain, k) and {len(x) for x, _ in got} == {size}
            assert fetching.state_dict() == plain.state_dict()
    with pytest.raises(ValueError, match="does not divide over 2 ranks"):
        StatefulLoader(windows, 4, rank=0, world=2, seed=3).set_batch_size(5)


def test_loader_ranks_together_read_the_global_batch(windows):
    whole = StatefulLoader(windows, 4, seed=2)
    ranks = [StatefulLoader(windows, 4, rank=r, world=2, seed=2) for r in range(2)]
    for _ in range(6):
        x, _y = whole.next()
        parts = [lo.next()[0] for lo in ranks]
        assert sorted(map(tuple, x.tolist())) == sorted(
            tuple(row) for p in parts for row in p.tolist())


def test_eval_batches_are_fixed_sequential_and_cover_all(windows):
    first = [x[:, 0].tolist() for x, _ in eval_batches(windows, 4, 0)]
    assert first == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90]]
    assert [x[:, 0].tolist() for x, _ in eval_batches(windows, 4, 0)] == first
    assert len(list(eval_batches(windows, 4, 2))) == 2
    for world in (2, 3):
        per_rank = [[x[:, 0].tolist() for x, _ in eval_batches(windows, 4, 0, r, world)]
                    for r in range(world)]
        assert all(len(b) == 3 for b in per_rank)  # same count on every rank
        got = sorted(v for b in per_rank for batch in b for v in batch)
        assert got == list(range(0, 100, 10))
