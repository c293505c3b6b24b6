"""An MoE llama under tensor parallelism (models/plans.py `moe_tp_plan`: router and
routed experts replicated over tp, shared experts sharded like the dense MLP; under
sequence parallel the MoE input gathered before the router, the output cut after)
against one process, through the TP × PP × DP harness (mp_harness.py), which wires the
MoE terms as the trainer does: loss terms into the step loss, the statistics summed over
the data-parallel ranks, the sigmoid_bias update after each step.

Layouts: TP=2 (also with full AC) and TP=2 + SP (with a capacity factor: tokens
dropped) on 2 processes; TP=2 × FSDP2 (dp_shard=2: experts FSDP2-sharded over dp only,
replicated over tp) and TP=2 × PP=2 on 4. Model: block 0 dense, block 1 MoE with 8
experts top-2 (uneven loads: the test asserts a step where an expert's load is far from
the mean), one shared expert, the sigmoid_bias router with aux and z losses on; masked
targets give ranks unequal target counts. fp32: losses to 1e-6 relative over 10 steps
(DESIGN.md §5; measured 1.1e-7); fp64: parameters (experts and bias included) to 1e-10
and the global gradient norm of every step to 1e-10 relative (measured <= 3e-14 and
<= 2e-14) — the norm sees a gradient counted tp times or left un-reduced directly, the
parameters through Adam and the clip. Every rank's metrics.jsonl MoE fields
(moe_terms.record()) equal the one process's: counted once, not tp times.
"""

from __future__ import annotations

import pytest

from moe_layouts import MOE, check, moe, uneven
from mp_harness import mp_runs, reference
from spawn import run_distributed

# Several tiny runs per spawned group (plus their one-process references): minutes on
# 2 shared cores; the spawn timeouts below still end a hang.
pytestmark = pytest.mark.timeout(900)


def test_moe_tp_and_sp_match_one_process():
    """TP=2 (fp32 losses; fp64 parameters and norms with full activation checkpointing,
    against the one process without: the recompute routes the same tokens again, the
    terms were collected once) and TP=2 + SP (fp64, with a
    capacity factor of 1: the drops counted once, and the same as one process's because
    the gathered layer caps each expert over the whole micro-batch) on 2 ranks."""
    runs = {"tp2": moe(tp=2),
            "tp2 fp64 full AC": moe(tp=2, dtype="fp64", params=True, ac="full"),
            "tp2+sp fp64 capacity": moe(tp=2, sp=True, dtype="fp64", params=True,
                                        model=MOE + (("moe_capacity_factor", 1.0),))}
    outs = run_distributed(mp_runs, 2, list(runs.values()), timeout=600)
    for i, (name, spec) in enumerate(runs.items()):
        check(name, spec, [out[i] for out in outs])
    assert uneven(reference(runs["tp2"]))
    dropped = [r["moe_dropped"] for r in reference(runs["tp2+sp fp64 capacity"])["moe_records"]]
    assert all(d > 0 for d in dropped), dropped


def test_moe_tp_by_fsdp_and_by_pp_match_one_process():
    """On 4 ranks: TP=2 × FSDP2 (dp_shard=2: dense weights 2-D sharded, the experts
    FSDP2-sharded over dp and replicated over tp; fp32 losses, fp64 parameters), and
    TP=2 × PP=2 in fp64 (1f1b; the MoE block on the second stage, whose statistics the
    pipeline sums over every rank, each tp group's once: parallel/pipeline_moe.py)."""
    runs = {"fsdp2xtp2": moe(tp=2, dp_shard=2),
            "fsdp2xtp2 fp64": moe(tp=2, dp_shard=2, dtype="fp64", params=True),
            "pp2xtp2 fp64": moe(tp=2, pp=2, dtype="fp64", params=True)}
    outs = run_distributed(mp_runs, 4, list(runs.values()), timeout=800)
    for i, (name, spec) in enumerate(runs.items()):
        check(name, spec, [out[i] for out in outs])
