"""An MoE llama's tensor-parallel plan (models/plans.py `moe_tp_plan`) and the layouts
parallel/moe_checks.py admits with TP: what is replicated, what is sharded, and the
one-line refusals at the boundary. The math against one process is
tests/distributed/test_moe_tp.py's."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               PrepareModuleInputOutput, RowwiseParallel)

from scaletrain.config.load import build_config
from scaletrain.errors import ConfigError
from scaletrain.models.registry import spec_of
from scaletrain.models.tp_styles import plan_sharded
from scaletrain.parallel.moe_checks import check_moe_layout
from scaletrain.parallel.tensor import check_tp

MOE = ("model.name=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2",
       "model.d_model=32", "model.moe_experts=4", "model.moe_d_ff=16",
       "model.moe_shared_experts=1", "model.moe_first_dense=1")


def _cfg(*over: str):
    return build_config(None, [tuple(a.split("=", 1)) for a in over])


def _plan(cfg, sp: bool):
    spec = spec_of(cfg.model)
    with torch.device("meta"):
        model = spec.build(cfg.model, {"vocab_size": 64})
    return model, spec.tp_plan(model, sequence_parallel=sp)


@pytest.mark.parametrize("sp", [False, True])
def test_moe_block_shards_shared_experts_and_replicates_router_and_experts(sp):
    model, plan = _plan(_cfg(*MOE), sp)
    sharded = plan_sharded(model, plan)
    moe = "blocks.1.mlp"
    # The shared expert is sharded as the dense MLP is; the router and the 3-D routed
    # experts are replicated (in the plan, but not sharded); the bias is no parameter.
    assert isinstance(plan[f"{moe}.shared_experts.gate_proj"], ColwiseParallel)
    assert isinstance(plan[f"{moe}.shared_experts.down_proj"], RowwiseParallel)
    assert {f"{moe}.gate", f"{moe}.experts"} <= set(plan)
    assert {f"{moe}.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj",
                                                          "down_proj")} <= sharded
    assert not any(n.startswith((f"{moe}.gate.", f"{moe}.experts.")) for n in sharded)
    # The dense block 0 keeps its plan.
    assert "blocks.0.mlp.down_proj.weight" in sharded
    # Under SP the MoE layer gathers its input and cuts its output (the dense MLP only
    # gathers: its row-parallel down_proj reduce-scatters).
    if sp:
        assert isinstance(plan[moe], PrepareModuleInputOutput)
        assert isinstance(plan["blocks.0.mlp"], PrepareModuleInput)
    else:
        assert moe not in plan


def test_moe_tp_layouts_admitted_and_their_boundary_refused():
    for layout in (("parallel.tp=2",), ("parallel.tp=2", "parallel.sequence_parallel=true"),
                   ("parallel.tp=2", "parallel.dp_shard=2"), ("parallel.tp=2", "parallel.pp=2")):
        check_moe_layout(_cfg(*MOE, *layout))
    with pytest.raises(ConfigError, match="train.compile with parallel.tp > 1 is not supported"):
        check_moe_layout(_cfg(*MOE, "parallel.tp=2", "train.compile=true"))


def test_tp_must_divide_the_shared_experts_width():
    cfg = _cfg(*MOE, "model.moe_d_ff=3")  # 1 shared expert of width 3
    with pytest.raises(ConfigError, match=r"the shared experts' width .*=3"):
        check_tp(cfg.model, 64, 2, False)
    check_tp(_cfg(*MOE).model, 64, 2, False)
