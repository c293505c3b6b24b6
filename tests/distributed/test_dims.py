"""ParallelDims: degrees × = world, -1 inferred, clear one-line errors (no processes)."""

from __future__ import annotations

import pytest

from scaletrain.config import build_config
from scaletrain.config.checks import accumulation_steps, check_parallel
from scaletrain.errors import ConfigError
from scaletrain.config.dims import ParallelDims, resolve_dims


@pytest.mark.parametrize("given,world,want", [
    ((1, -1, 1, 1), 4, (1, 4, "fsdp")),
    ((-1, 1, 1, 1), 4, (4, 1, "ddp")),
    ((2, -1, 1, 1), 8, (2, 4, "hsdp")),
    ((1, 1, 1, 1), 1, (1, 1, "single")),
    ((1, -1, 1, 1), 1, (1, 1, "single")),
])
def test_resolve(given, world, want):
    d = ParallelDims.resolve(*given, world=world)
    assert (d.dp_replicate, d.dp_shard, d.strategy) == want
    assert d.dp == world


@pytest.mark.parametrize("given,world,words", [
    ((1, 2, 1, 1), 4, ["= 2", "world size is 4"]),
    ((3, -1, 1, 1), 4, ["not divisible by", "parallel.dp_shard=-1"]),
    ((-1, -1, 1, 1), 4, ["only one of"]),
    ((1, 0, 1, 1), 1, ["parallel.dp_shard=0"]),
])
def test_errors_name_the_fields(given, world, words):
    with pytest.raises(ConfigError) as e:
        ParallelDims.resolve(*given, world=world)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_mesh_shape_names_the_dimensions():
    assert ParallelDims(2, 2, 1, 1, 4).mesh_shape() == ((2, 2), ("dp_replicate", "dp_shard"))
    assert ParallelDims(1, 4, 1, 1, 4).mesh_shape() == ((4,), ("dp_shard",))


def test_accumulation_from_global_batch_micro_batch_and_dp():
    cfg = build_config(None, [("train.batch_size", "32"), ("train.micro_batch_size", "2")])
    dims = {w: resolve_dims(cfg.parallel, w) for w in (1, 2, 4, 8, 32)}  # the runs' layouts
    assert [accumulation_steps(cfg, dims[w]) for w in (1, 2, 4, 8)] == [16, 8, 4, 2]
    with pytest.raises(ConfigError, match="train.micro_batch_size=2"):
        check_parallel(cfg, 32, dims[32])  # 32 ranks: one sample each, below the micro-batch
