"""An MoE llama through pipeline stages (parallel/pipeline_moe.py) against one process:
1f1b (every block MoE: the first stage's balance and z losses reach the gradient only
through its own backward) and interleaved-1f1b (2 stages per rank, a dense first block:
one of rank 0's stages has no MoE layer), on 2 processes.

fp32: the logged losses to 1e-6 relative over 10 steps. fp64: the parameters (the
balancing bias included) to 1e-10, the bias bitwise, and the metrics.jsonl MoE fields
(loads per expert, imbalance, aux and z losses, dropped) of every layer equal to one
process's on every rank. The sigmoid_bias router with the aux and z losses on, masked
targets (unequal counts per micro-batch) and clipping.
"""

from __future__ import annotations

import pytest

from mp_harness import assert_parity, mp_runs, mp_spec, reference
from spawn import run_distributed

from scaletrain.parallel.pipeline_step import merge_stage_states

MOE = (("name", "llama"), ("n_kv_head", 1), ("moe_experts", 4), ("moe_top_k", 2),
       ("moe_d_ff", 8), ("moe_shared_experts", 1), ("moe_router", "sigmoid_bias"),
       ("moe_aux_loss", 0.1), ("moe_z_loss", 0.01), ("moe_bias_update_rate", 0.01))
SCHEDULES = {"1f1b": dict(schedule="1f1b", model=MOE + (("moe_first_dense", 0),)),
             "interleaved": dict(schedule="interleaved-1f1b", micro=1,
                                 model=MOE + (("moe_first_dense", 1),))}


def _spec(schedule: str, dtype: str) -> dict:
    return mp_spec(steps=10, pp=2, n_layer=4, d_model=16, masked=True, dtype=dtype,
                   params=dtype == "fp64", **SCHEDULES[schedule])


@pytest.fixture(scope="module")
def runs():
    specs = [_spec(s, d) for s in SCHEDULES for d in ("fp32", "fp64")]
    outs = run_distributed(mp_runs, 2, specs, timeout=240)
    return {(s["schedule"], s["dtype"]): (s, r0, r1)
            for s, r0, r1 in zip(specs, outs[0], outs[1])}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_moe_pipeline_losses_match_one_process_fp32(runs, schedule):
    spec, r0, r1 = runs[(SCHEDULES[schedule]["schedule"], "fp32")]
    ref = reference(spec)
    assert_parity(ref, r0, first_tol=1e-6, tol=1e-6)
    assert r0["losses"] == r1["losses"]  # every stage reports the loss
    print(f"moe pp=2 {schedule}: max loss rel diff {_rel(ref, r0):.2e} (fp32)")


def _rel(ref: dict, got: dict) -> float:
    return max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"]))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_moe_pipeline_params_and_records_match_one_process_fp64(runs, schedule):
    spec, r0, r1 = runs[(SCHEDULES[schedule]["schedule"], "fp64")]
    ref = reference(spec)
    got = merge_stage_states([r0["params"], r1["params"]])
    assert sorted(got) == sorted(ref["params"])
    diff = max((got[k] - ref["params"][k]).abs().max().item() for k in ref["params"])
    assert diff <= 1e-10, f"parameters differ by {diff:.3g}"
    biases = [k for k in ref["params"] if k.endswith("expert_bias")]
    assert len(biases) == (4 if schedule == "1f1b" else 3)
    assert any(ref["params"][k].abs().sum() > 0 for k in biases)  # the bias moved
    assert all(got[k].equal(ref["params"][k]) for k in biases)
    for step, (a, b, c) in enumerate(zip(ref["moe_records"], r0["moe_records"],
                                         r1["moe_records"]), 1):
        for rec in (b, c):  # both pipeline ranks hold every layer's global record
            assert sorted(rec["moe_load"]) == sorted(a["moe_load"])
            assert rec["moe_load"] == a["moe_load"], step
            assert rec["moe_imbalance"] == a["moe_imbalance"], step
            assert rec["moe_dropped"] == a["moe_dropped"]
            for key in ("moe_aux_loss", "moe_z_loss"):
                assert rec[key] == pytest.approx(a[key], rel=1e-12), (step, key)
    print(f"moe pp=2 {schedule}: max param diff {diff:.2e} (fp64)")


def test_moe_pipeline_with_expert_parallel_matches_one_process():
    """EP × PP on 4 processes (pp=2, dp_shard=2, ep=2; config/dims.py's expert mesh
    ("pp", "efsdp", "ep"): each stage's 2 ranks split its 4 experts 2 + 2, dense weights
    FSDP2 over them), 1f1b, every block MoE, 10 steps: fp32 losses to 1e-6 relative on
    every rank; fp64 parameters (experts gathered to their full (E, D, F)) to 1e-10, the
    bias bitwise and the MoE records equal to one process's."""
    layout = dict(pp=2, dp_shard=2, ep=2, n_layer=2, d_model=16, masked=True, steps=10,
                  model=MOE + (("moe_first_dense", 0),))
    specs = [mp_spec(dtype="fp32", **layout), mp_spec(dtype="fp64", params=True, **layout)]
    outs = run_distributed(mp_runs, 4, specs, timeout=400)
    for rank in range(4):
        assert_parity(reference(specs[0]), outs[rank][0], first_tol=1e-6, tol=1e-6)
    print(f"moe ep2 x pp2 x fsdp2: max loss rel diff "
          f"{_rel(reference(specs[0]), outs[0][0]):.2e} (fp32)")
    ref = reference(specs[1])
    # ranks 0, 1: stage 0; ranks 2, 3: stage 1 (the world mesh's ("pp", "dp_shard"))
    got = merge_stage_states([outs[0][1]["params"], outs[2][1]["params"]])
    assert sorted(got) == sorted(ref["params"])
    assert all(outs[r][1]["params"][k].equal(outs[r + 1][1]["params"][k])
               for r in (0, 2) for k in outs[r][1]["params"])  # both ranks of a stage
    diff = max((got[k] - ref["params"][k]).abs().max().item() for k in ref["params"])
    assert diff <= 1e-10, f"parameters differ by {diff:.3g}"
    biases = [k for k in ref["params"] if k.endswith("expert_bias")]
    assert len(biases) == 2 and all(got[k].equal(ref["params"][k]) for k in biases)
    for rank in range(4):
        for a, b in zip(ref["moe_records"], outs[rank][1]["moe_records"]):
            assert b["moe_load"] == a["moe_load"] and b["moe_imbalance"] == a["moe_imbalance"]
            assert b["moe_aux_loss"] == pytest.approx(a["moe_aux_loss"], rel=1e-12)
            assert b["moe_z_loss"] == pytest.approx(a["moe_z_loss"], rel=1e-12)
    print(f"moe ep2 x pp2 x fsdp2: max param diff {diff:.2e} (fp64)")
