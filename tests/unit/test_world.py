"""The world (size, rank) is known in one place (parallel/world.py) and handed to
validation, so one config is judged the same by the `--nproc N` launcher, before torchrun
starts, and by each of the N ranks it starts (issue 14 item 2)."""

from __future__ import annotations

import pytest

from scaletrain.config import build_config
from scaletrain.errors import ConfigError
from scaletrain.parallel.world import World
from scaletrain.parallel.world_checks import check_world

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def test_the_world_of_a_rank_and_of_a_launcher(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert World.from_env() == World()  # one process, not launched
    for k, v in zip(TORCHRUN_ENV, ("3", "4", "1", "2")):
        monkeypatch.setenv(k, v)
    rank = World.from_env()
    assert (rank.size, rank.rank, rank.local_rank, rank.local_size, rank.nnodes,
            rank.launched, rank.is_main) == (4, 3, 1, 2, 2, True, False)
    launcher = World.launching(2)
    assert (launcher.size, launcher.local_size, launcher.is_main, launcher.launched) == \
        (2, 2, True, False)


def _verdict(overrides: list[tuple[str, str]], world: World) -> str | None:
    """What validation says of a config on `world`: build_config, then the world checks
    (the launcher's and every rank's judge); None if it may run."""
    try:
        cfg = build_config(None, overrides)
        check_world(cfg, world.size, cfg.model.vocab_size or None)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("overrides, refused", [
    # valid on one process, refused on two: stochastic descent cannot be data-parallel
    ([("parallel.dp_shard", "-1"), ("train.descent", "stochastic")],
     "cannot run data-parallel"),
    # model.weight_norm needs one process; dp_shard=-1 makes it two
    ([("parallel.dp_shard", "-1"), ("model.weight_norm", "true")],
     "weight_norm is not supported with parallel layouts"),
    # and one that runs on two: both paths accept it
    ([("parallel.dp_shard", "-1"), ("train.batch_size", "8"),
      ("train.micro_batch_size", "2")], None),
])
def test_a_config_is_judged_the_same_by_the_launcher_and_by_its_ranks(
        overrides, refused, monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    in_launcher = _verdict(overrides, World.launching(2))  # `train --nproc 2`, pre-launch
    for k, v in zip(TORCHRUN_ENV, ("1", "2", "1", "2")):
        monkeypatch.setenv(k, v)
    on_rank = _verdict(overrides, World.from_env())  # what torchrun's rank 1 sees
    assert in_launcher == on_rank
    if refused is None:
        assert on_rank is None
    else:
        assert on_rank is not None and refused in on_rank
    # On one process the same config is fine (the rule is the world's, not the config's).
    assert _verdict(overrides, World()) is None
