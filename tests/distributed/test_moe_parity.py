"""An MoE llama (models/moe.py) under DDP and FSDP2 against one process, and with
activation checkpointing against without: parameters, the balancing bias and the logged
MoE statistics equal in fp64 (the layouts parallel/moe_checks.py admits).

The run wires the MoE terms as the trainer does (train/trainer.py): the layers' loss
terms into the step loss's `extra`, the bias update as StepEnd's `after_step`, the
statistics summed over the data-parallel ranks. Masked targets give ranks unequal
target counts, the sigmoid_bias router with aux and z losses on; all experts sharded on
dim 0 under FSDP2 (4 experts over 2 ranks).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import Tokens, V, T
from spawn import run_distributed

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.data.loader import StatefulLoader
from scaletrain.models.moe_terms import moe_step_terms
from scaletrain.optim import build_optimizer
from scaletrain.optim.step_end import StepEnd
from scaletrain.parallel.context import DistContext
from scaletrain.config.dims import resolve_dims
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.parallel.weights import full_state_dict
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.step import StepOptions, split_micro_batches, train_step
from scaletrain.train.step_loss import build_step_loss

MOE = ModelConfig(name="llama", n_layer=2, n_head=2, d_model=16, seq_len=T, moe_experts=4,
                  moe_top_k=2, moe_d_ff=8, moe_shared_experts=1, moe_router="sigmoid_bias",
                  moe_aux_loss=0.1, moe_z_loss=0.01, moe_bias_update_rate=0.01)
STEPS = 6


def moe_run(rank: int, world: int, layout: dict) -> dict:
    device = torch.device("cpu")
    pcfg = ParallelConfig(dp_replicate=layout.get("dp_replicate", 1),
                          dp_shard=layout.get("dp_shard", 1), timeout_s=60,
                          activation_checkpoint=layout.get("ac", "none"))
    ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), device)
    policy = PrecisionPolicy("fp64", device)
    pm = build_parallel_model(MOE, {"vocab_size": V}, seed=3, dims=ctx.dims, mesh=ctx.mesh,
                              pcfg=pcfg, policy=policy, device=device, compile=False)
    model = pm.module
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))
    loader = StatefulLoader(Tokens(masked=True), 8, rank=rank, world=ctx.dims.dp, seed=5)
    terms = moe_step_terms(model, ctx.sum_reducer, MOE.moe_bias_update_rate)
    loss = dataclasses.replace(build_step_loss(), extra=terms.collect)
    end = StepEnd(grad_clip=0.05, after_step=terms.end_step)
    opts = StepOptions(**ctx.step_options(pm))
    records, biases = [], []
    with ctx.guard():
        for _ in range(STEPS):
            micro = split_micro_batches(loader.next(), 2)
            train_step(model, micro, opt, policy, None, opts, step_loss=loss, end=end)
            records.append(terms.record())
            biases.append(torch.cat([m.expert_bias for m in terms.layers]).clone())
    params = full_state_dict(model)  # a collective under FSDP2
    out = {"strategy": ctx.dims.strategy, "records": records, "biases": biases}
    if rank == 0:
        out["params"] = {k: v.clone() for k, v in params.items()}
    return out


LAYOUTS = {"ddp": dict(dp_replicate=2), "fsdp": dict(dp_shard=2)}


def _both(rank: int, world: int) -> list:
    return [moe_run(rank, world, layout) for layout in LAYOUTS.values()]


@pytest.fixture(scope="module")
def runs():
    ref = moe_run(0, 1, {})
    got = run_distributed(_both, 2, timeout=240)[0]
    return ref, dict(zip(LAYOUTS, got))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_one_process(runs, name):
    ref, got = runs[0], runs[1][name]
    assert got["strategy"] == name
    assert sorted(got["params"]) == sorted(ref["params"])
    assert any(k.endswith("expert_bias") for k in ref["params"])
    diff = max((got["params"][k] - ref["params"][k]).abs().max().item()
               for k in ref["params"])
    assert diff <= 1e-10, f"parameters differ by {diff:.3g}"
    # The bias moved (sign steps of ±rate; on this tiny model it oscillates around 0)
    # and moved the same way on every rank of every layout.
    assert any(b.abs().sum() > 0 for b in ref["biases"])
    assert all(torch.equal(a, b) for a, b in zip(ref["biases"], got["biases"]))
    for a, b in zip(ref["records"], got["records"]):
        assert a["moe_imbalance"] == b["moe_imbalance"]  # global loads: same counts
        assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], rel=1e-12)
    print(f"moe {name}: max param diff {diff:.2e} (fp64)")


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_moe_with_activation_checkpointing_matches_without(runs, ac):
    """The recompute inside backward runs the MoE forward again: the loss terms were
    collected once, before it (models/moe_terms.py), and the routing recomputes the
    same choice, so the run is bitwise the one without AC."""
    ref, got = runs[0], moe_run(0, 1, {"ac": ac})
    assert all(torch.equal(got["params"][k], ref["params"][k]) for k in ref["params"])
    assert all(torch.equal(a, b) for a, b in zip(ref["biases"], got["biases"]))
    assert [r["moe_load"] for r in got["records"]] == [r["moe_load"] for r in ref["records"]]
