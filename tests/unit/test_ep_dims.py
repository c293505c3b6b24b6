"""`parallel.ep` in ParallelDims (config/dims.py) and against the model
(parallel/moe_checks.py): the degrees it resolves to and the one-line refusals."""

from __future__ import annotations

import pytest

from scaletrain.config.dims import ParallelDims
from scaletrain.config.load import build_config
from scaletrain.errors import ConfigError
from scaletrain.parallel.moe_checks import check_expert_parallel, check_moe_layout


def test_ep_is_carved_out_of_dp_shard():
    d = ParallelDims.resolve(1, -1, 1, 1, 4, ep=2)
    assert (d.dp_shard, d.ep, d.efsdp, d.dp, d.world) == (4, 2, 2, 4, 4)
    assert d.mesh_shape() == ((4,), ("dp_shard",))  # the world mesh is unchanged
    assert ParallelDims.resolve(1, -1, 1, 1, 2, ep=2).efsdp == 1
    assert ParallelDims.resolve(1, -1, 1, 1, 2).ep == 1
    # In HSDP replicas: each replica's dp_shard ranks split the experts (efsdp 1: the
    # experts replicated over the replicas, DDP-like).
    d = ParallelDims.resolve(2, -1, 1, 1, 4, ep=2)
    assert (d.dp_replicate, d.dp_shard, d.ep, d.efsdp, d.strategy) == (2, 2, 2, 1, "hsdp")
    assert ParallelDims.resolve(2, 4, 1, 1, 8, ep=2).efsdp == 2
    # In pipeline stages: each stage's dp_shard ranks split its experts.
    d = ParallelDims.resolve(1, -1, 1, 2, 4, ep=2)
    assert (d.pp, d.dp_shard, d.ep, d.efsdp) == (2, 2, 2, 1)


@pytest.mark.parametrize("degrees,ep,needle", [
    ((1, -1, 1, 1, 2), 4, "parallel.ep=4 must divide parallel.dp_shard=2"),
    ((2, 1, 1, 1, 2), 2, "parallel.ep=2 must divide parallel.dp_shard=1"),  # DDP: no shard
    ((2, 2, 1, 2, 8), 2, "parallel.dp_replicate=2 and parallel.pp=2 together is not"),
    ((2, 2, 2, 1, 8), 2, "parallel.dp_replicate=2 and parallel.tp=2 together is not"),
    ((1, 2, 2, 2, 8), 2, "parallel.tp=2 and parallel.pp=2 together is not"),
])
def test_ep_layouts_refused(degrees, ep, needle):
    with pytest.raises(ConfigError, match=needle):
        ParallelDims.resolve(*degrees, ep=ep)


def _cfg(*over: str):
    return build_config(None, [tuple(a.split("=", 1)) for a in over])


def test_ep_against_the_model():
    moe = ("model.name=llama", "model.n_layer=2", "model.moe_experts=4")
    check_expert_parallel(_cfg(*moe, "parallel.ep=2"))
    with pytest.raises(ConfigError, match="must divide model.moe_experts=4"):
        check_expert_parallel(_cfg(*moe, "parallel.ep=3"))
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        check_expert_parallel(_cfg("model.name=llama", "parallel.ep=2"))
    # tests/distributed/test_moe_ep_layouts.py runs it
    check_expert_parallel(_cfg(*moe, "parallel.ep=2", "parallel.cpu_offload=true"))
    for ac in ("full", "selective"):  # tests/distributed/test_moe_ep.py runs them
        check_expert_parallel(_cfg(*moe, "parallel.ep=2", f"parallel.activation_checkpoint={ac}"))


def test_moe_compiles_per_block_and_whole_model():
    """train.compile trains MoE layers per block and, on one process, as the whole model
    (test_moe_ep.py and test_moe_ep_layouts.py against eager); with TP it is refused."""
    moe = ("model.name=llama", "model.n_layer=2", "model.moe_experts=4", "train.compile=true")
    check_moe_layout(_cfg(*moe))
    check_moe_layout(_cfg(*moe, "parallel.ep=2"))
    with pytest.raises(ConfigError, match="train.compile_scope='model' is not supported"):
        check_moe_layout(_cfg(*moe, "train.compile_scope=model"))
    with pytest.raises(ConfigError, match="train.compile with parallel.tp > 1 is not"):
        check_moe_layout(_cfg(*moe, "parallel.tp=2"))
