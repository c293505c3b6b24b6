"""Parameter-server pieces that need no processes: shard assignment, config rules, the
CLI refusing a bad PS layout before it launches anything."""

from __future__ import annotations

import pytest

from scaletrain.config import build_config
from scaletrain.config.checks import check_parallel
from scaletrain.errors import ConfigError
from scaletrain.paramserver.sharding import assign_shards
from tests.conftest import run_cli


def test_shards_are_balanced_complete_and_ordered():
    sizes = {"wte": 1000, "a": 300, "b": 300, "c": 250, "d": 250, "e": 100, "f": 1}
    shards = assign_shards(sizes, 2)
    assert sorted(n for s in shards for n in s) == sorted(sizes)  # each tensor once
    loads = [sum(sizes[n] for n in s) for s in shards]
    assert max(loads) - min(loads) <= 1000 - 901  # LPT: {wte} vs {a, b, c, d, e, f}
    for s in shards:  # model order inside a shard (the optimizer sees the model's order)
        assert s == [n for n in sizes if n in s]
    assert assign_shards(sizes, 2) == shards  # every process computes the same


def test_more_servers_than_tensors_is_refused():
    with pytest.raises(ConfigError, match="parallel.ps_servers=3"):
        assign_shards({"a": 1, "b": 2}, 3)


@pytest.mark.parametrize("overrides, world, fragment", [
    ([("parallel.ps_servers", "2")], 2, "leaves no worker"),
    ([("train.batch_size", "9")], 3, "divisible by the 2 PS workers"),
    ([("parallel.ps_push_every", "2")], 3, "apply to ps_consistency='async' only"),
    ([("parallel.dp_replicate", "2")], 3, "replaces data/tensor/pipeline"),
    ([("precision.dtype", "fp16")], 3, "not supported with parallel.mode='ps'"),
    ([("parallel.ps_slow_worker", "2")], 3, "only 2 workers"),
])
def test_ps_config_errors_name_the_field(overrides, world, fragment):
    # Rules that need no world size fire when the config is built, the others once the
    # world is known (the launcher's --nproc, or $WORLD_SIZE on each rank).
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_parallel(build_config(None, [("parallel.mode", "ps"),
                                           ("train.batch_size", "8")] + overrides), world)


def test_valid_ps_layout_passes():
    cfg = build_config(None, [("parallel.mode", "ps"), ("parallel.ps_servers", "2"),
                              ("train.batch_size", "8"), ("parallel.ps_consistency", "ssp")])
    check_parallel(cfg, 4)  # 2 servers + 2 workers: no error


def test_cli_refuses_bad_ps_layout_before_launch(tmp_path):
    proc = run_cli("train", "--nproc", "2", "--parallel.mode=ps", "--parallel.ps_servers=2",
                   f"--run.dir={tmp_path / 'r'}", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.ps_servers=2 leaves no worker" in proc.stderr
    assert "Traceback" not in proc.stderr
