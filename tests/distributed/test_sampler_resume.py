"""The data order is a property of the *global* batch: a run saved on N ranks and resumed
on M ranks consumes exactly the samples the N-rank run would have consumed next — none
skipped, none repeated (issue #5, item 5). Tested on the loader directly, no processes."""

from __future__ import annotations

import numpy as np
import pytest

from scaletrain.data.loader import StatefulLoader
from tests.helpers.loaders import Indices, global_batches


def ranks(n: int, batch: int, world: int, assignment: str, state=None, seed: int = 7):
    out = [StatefulLoader(Indices(n), batch, rank=r, world=world, seed=seed,
                          assignment=assignment) for r in range(world)]
    if state is not None:
        for ld in out:
            ld.load_state_dict(state)
    return out


@pytest.mark.parametrize("assignment", ["block", "strided"])
@pytest.mark.parametrize("saved_world,resumed_world", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_resume_on_another_world_size(saved_world, resumed_world, assignment):
    n, batch, k, total = 50, 8, 10, 20  # batches straddle epoch ends (50 % 8 != 0)
    reference = global_batches(ranks(n, batch, saved_world, assignment), total)
    first = ranks(n, batch, saved_world, assignment)
    head = global_batches(first, k)
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states)  # the state is global: equal on all ranks
    tail = global_batches(ranks(n, batch, resumed_world, assignment, states[0]), total - k)
    assert head + tail == reference
    # No sample skipped or repeated: each epoch's samples, in consumption order, are a
    # permutation of the dataset.
    flat = [i for b in head + tail for i in b]
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))


def test_each_rank_reads_a_disjoint_part_of_the_global_batch():
    for assignment in ("block", "strided"):
        parts = [ld.next()[0] for ld in ranks(40, 8, 4, assignment)]
        assert len(set(np.concatenate(parts).tolist())) == 8
        assert all(len(p) == 2 for p in parts)
