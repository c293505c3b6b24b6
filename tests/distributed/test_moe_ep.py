"""Expert parallelism (parallel/expert.py) against one process: EP=2 on 2 ranks (dense
weights FSDP2 over 2, the 8 experts split 4 + 4) and EP=2 × FSDP2 on 4 ranks (dense
weights over 4, each expert slice FSDP2-sharded over the 2 ranks that share it).

Losses to 1e-6 relative in fp32 over 10 steps, parameters (experts included, gathered
to their full (E, D, F) tensors), the balancing bias and the logged MoE statistics to
1e-10 in fp64. The run is wired as the trainer wires it (test_moe_parity.py): the
sigmoid_bias router with aux and z losses on, masked targets (unequal target counts
per rank), micro-batches of one sequence (accumulation: 4 per rank on 2 ranks, 2 on 4,
8 in the one process). Uneven loads: 8 experts, top-2, micro-
batches of 16 tokens — the run asserts that some micro-batch on some rank routed no
token to some expert, so the all-to-all saw empty and uneven splits.

EP=2 on 2 ranks with full and selective activation checkpointing against the same
one-process run without it, to the same tolerances: the recompute in the backward runs
both all-to-alls again, and the experts' FSDP2 unit sits inside the checkpointed block
(parallel/ac.py, parallel/moe_checks.py). train.compile per block on one process and
with EP=2 against the eager one process (fp32 losses to 1e-6): the experts' segment loop
and the expert-parallel exchange stay eager inside the compiled blocks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from harness import Tokens, V, T
from spawn import run_distributed

from scaletrain.config.dims import resolve_dims
from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.data.loader import StatefulLoader
from scaletrain.models.moe_terms import moe_step_terms
from scaletrain.optim import build_optimizer
from scaletrain.optim.step_end import StepEnd
from scaletrain.parallel.context import DistContext
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.parallel.weights import full_state_dict
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.step import StepOptions, split_micro_batches, train_step
from scaletrain.train.step_loss import build_step_loss

MOE = ModelConfig(name="llama", n_layer=2, n_head=2, d_model=16, seq_len=T, moe_experts=8,
                  moe_top_k=2, moe_d_ff=8, moe_shared_experts=1, moe_router="sigmoid_bias",
                  moe_aux_loss=0.1, moe_z_loss=0.01, moe_bias_update_rate=0.01)
STEPS, BATCH, MICRO = 10, 8, 1


def ep_run(rank: int, world: int, dtype: str, ep: int, ac: str = "none",
           compile: bool = False, replicate: int = 1, offload: bool = False) -> dict:
    """`replicate` HSDP replicas of world / replicate FSDP2 ranks each; `offload`:
    parallel.cpu_offload (test_moe_ep_layouts.py)."""
    device = torch.device("cpu")
    pcfg = ParallelConfig(dp_replicate=replicate, dp_shard=world // replicate, ep=ep,
                          timeout_s=60, activation_checkpoint=ac, cpu_offload=offload)
    ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), device)
    policy = PrecisionPolicy(dtype, device)
    pm = build_parallel_model(MOE, {"vocab_size": V}, seed=3, dims=ctx.dims, mesh=ctx.mesh,
                              pcfg=pcfg, policy=policy, device=device, compile=compile,
                              expert_mesh=ctx.expert_mesh)
    model = pm.module
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))
    loader = StatefulLoader(Tokens(masked=True), BATCH, rank=rank, world=ctx.dims.dp, seed=5)
    terms = moe_step_terms(model, ctx.sum_reducer, MOE.moe_bias_update_rate)
    empty = []  # per forward: experts of some layer that got no token of this micro-batch

    def collect():
        empty.append(sum(int((layer.last.load == 0).sum()) for layer in terms.layers))
        return terms.collect()

    loss = dataclasses.replace(build_step_loss(), extra=collect)
    end = StepEnd(grad_clip=0.05, after_step=terms.end_step)
    opts = StepOptions(**ctx.step_options(pm))
    losses, norms, records, biases = [], [], [], []
    with ctx.guard():
        for _ in range(STEPS):
            micro = split_micro_batches(loader.next(), MICRO)
            r = train_step(model, micro, opt, policy, None, opts, step_loss=loss, end=end)
            losses.append(ctx.sum_reducer(r.loss.clone()).item())
            norms.append(float(r.grad_norm))
            records.append(terms.record())
            biases.append(torch.cat([m.expert_bias for m in terms.layers]).clone())
    params = full_state_dict(model)  # a collective under FSDP2 / EP
    out = {"losses": losses, "norms": norms, "records": records, "biases": biases,
           "empty": sum(empty), "ep": ctx.dims.ep, "strategy": ctx.dims.strategy,
           # the experts' FSDP2 parameters offloaded to the host (test_moe_ep_layouts.py)
           "offload": [p.offload_to_cpu for m in terms.layers
                       if hasattr(m.experts, "_get_fsdp_state")
                       for p in m.experts._get_fsdp_state()._fsdp_param_group.fsdp_params],
           # apply_ac checkpoints a block by setting its instance `forward`
           "checkpointed": sum("forward" in vars(b) for b in model.blocks.values()),
           # graphs dynamo produced, and why it broke them (explanations, shortened)
           "graphs": counters["stats"]["unique_graphs"],
           "breaks": [why.split("Explanation:")[-1][:200] for why in counters["graph_break"]],
           "local_experts": [tuple(_local(m.experts.gate_proj).shape)
                             for m in terms.layers],
           # this rank's expert shards (replicas must hold equal ones)
           "expert_shards": [_local(m.experts.gate_proj).clone() for m in terms.layers]}
    if rank == 0:
        out["params"] = {k: v.clone() for k, v in params.items()}
    return out


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (the whole tensor when it is not a DTensor)."""
    return (p.to_local() if hasattr(p, "to_local") else p).detach()


def _both(rank: int, world: int) -> list:
    return [ep_run(rank, world, dtype, 2) for dtype in ("fp64", "fp32")]


AC = ("full", "selective")


def _with_ac(rank: int, world: int) -> list:
    return [ep_run(rank, world, dtype, 2, ac) for ac in AC for dtype in ("fp64", "fp32")]


@pytest.fixture(scope="module")
def ref():
    """The one-process run without AC (ep 1: plain GroupedExperts)."""
    return {dtype: ep_run(0, 1, dtype, 1) for dtype in ("fp64", "fp32")}


@pytest.fixture(scope="module")
def runs():
    return {"ep2": run_distributed(_both, 2, timeout=300),
            "ep2_fsdp2": run_distributed(_both, 4, timeout=400)}


@pytest.fixture(scope="module")
def ac_runs():
    per_rank = run_distributed(_with_ac, 2, timeout=400)
    return {ac: [r[2 * i:2 * i + 2] for r in per_rank] for i, ac in enumerate(AC)}


@pytest.mark.parametrize("layout,world,efsdp", [("ep2", 2, 1), ("ep2_fsdp2", 4, 2)])
def test_expert_parallel_matches_one_process(ref, runs, layout, world, efsdp):
    check_against_one_process(ref, runs[layout], layout, world, efsdp)


@pytest.mark.parametrize("ac", AC)
def test_expert_parallel_with_activation_checkpointing_matches_one_process(ref, ac_runs, ac):
    """EP=2 × FSDP2 on 2 ranks, every block checkpointed, against one process without AC."""
    per_rank = ac_runs[ac]
    assert all(r[0]["checkpointed"] == MOE.n_layer for r in per_rank)
    check_against_one_process(ref, per_rank, f"ep2 ac={ac}", 2, 1)


def _compiled(rank: int, world: int) -> dict:
    return ep_run(rank, world, "fp32", 2, compile=True)


@pytest.fixture
def fresh_dynamo():
    """A compiled run from nothing, in this process: dynamo's in-process caches (and its
    counters) would otherwise carry over from and to other tests (test_compile.py)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def check_compiled(ref32: dict, got: dict, name: str) -> None:
    """train.compile per block against eager, fp32 losses over STEPS steps (1e-6: the
    compiled block differs from eager only by inductor's fusion of the element-wise ops,
    a few ulps per op, as the EP layouts do by their sums in another order)."""
    assert got["graphs"] > 0 and got["breaks"], "nothing compiled, or nothing left eager"
    assert len(got["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(ref32["losses"], got["losses"]), 1):
        assert b == pytest.approx(a, rel=1e-6), f"{name}: step {step} loss (fp32)"
    print(f"{name}: max loss rel diff "
          f"{max(abs(b - a) / a for a, b in zip(ref32['losses'], got['losses'])):.2e}, "
          f"{got['graphs']} graphs, breaks: {got['breaks']}")


# Inductor's C++ compile of the blocks' graphs: 1-2 min on the 2 shared cores, ~6 min at a
# load average of 14.
@pytest.mark.timeout(900)
def test_moe_compiled_matches_eager(ref, fresh_dynamo):
    """One process, train.compile per block (the segment loop eager inside the block):
    fp32 losses, and in fp64 the parameters to 1e-10 (fp32 losses miss a 1e-4 relative
    error in the compiled combine's weights; the fp64 parameters do not)."""
    got = ep_run(0, 1, "fp32", 1, compile=True)
    # the break is the one models/moe.py asks for (else: recompiles, then eager blocks)
    assert any("segment_matmul" in why for why in got["breaks"]), got["breaks"]
    check_compiled(ref["fp32"], got, "compiled")
    got64, ref64 = ep_run(0, 1, "fp64", 1, compile=True), ref["fp64"]["params"]
    diff = max((got64["params"][k] - ref64[k]).abs().max().item() for k in ref64)
    assert diff <= 1e-10, f"compiled: parameters differ by {diff:.3g} (fp64)"
    print(f"compiled: max param diff {diff:.2e} (fp64)")


@pytest.mark.timeout(900)
def test_expert_parallel_compiled_matches_eager(ref):
    """EP=2 on 2 ranks, compiled blocks, against the eager one-process run. The experts'
    FSDP2 unit is called eagerly (dynamo breaks at its hooks, which torch marks
    dynamo-disabled), its forward with the exchange too (parallel/expert.py)."""
    per_rank = run_distributed(_compiled, 2, timeout=840)
    for rank, got in enumerate(per_rank):
        check_compiled(ref["fp32"], got, f"ep2 compiled, rank {rank}")


def check_against_one_process(ref: dict, per_rank: list, layout: str, world: int,
                              efsdp: int) -> None:
    """The per-rank (fp64, fp32) runs of `layout` against the one-process ones."""
    assert len(per_rank) == world
    r64, r32 = per_rank[0]
    assert r64["ep"] == 2
    # Each rank holds E / ep = 4 experts of each layer, FSDP2-sharded over efsdp ranks.
    assert all(shape[0] == 4 // efsdp for shape in r64["local_experts"])
    assert sum(r[0]["empty"] for r in per_rank) > 0, "no empty expert: loads even"
    ref64, ref32 = ref["fp64"], ref["fp32"]
    assert sorted(r64["params"]) == sorted(ref64["params"])
    diff = max((r64["params"][k] - ref64["params"][k]).abs().max().item()
               for k in ref64["params"])
    assert diff <= 1e-10, f"{layout}: parameters differ by {diff:.3g} (fp64)"
    for a, b in zip(ref64["norms"], r64["norms"]):
        assert b == pytest.approx(a, rel=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(ref64["biases"], r64["biases"]))
    assert any(b.abs().sum() > 0 for b in ref64["biases"])
    for a, b in zip(ref64["records"], r64["records"]):
        assert a["moe_load"] == b["moe_load"]
        assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], rel=1e-12)
    assert len(r32["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(ref32["losses"], r32["losses"]), 1):
        assert b == pytest.approx(a, rel=1e-6), f"{layout}: step {step} loss (fp32)"
    print(f"{layout}: max param diff {diff:.2e} (fp64), max loss rel diff "
          f"{max(abs(b - a) / a for a, b in zip(ref32['losses'], r32['losses'])):.2e} "
          "(fp32)")
