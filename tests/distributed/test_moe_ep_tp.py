"""Expert parallelism × tensor parallelism (config/dims.py: within each tp index the
dp_shard ranks form the expert mesh and exchange tokens; the tp ranks of one group hold
the same expert slice, Shard(0) over ep and Replicate over tp: parallel/expert.py)
against one process, through the TP × PP × DP harness (mp_harness.py), wired as the
trainer wires the MoE terms (moe_layouts.py: 8 experts top-2, a shared expert, the
sigmoid_bias router with aux and z losses, masked targets).

On 4 ranks, dp_shard=2 × ep=2 × tp=2 (each rank holds 4 of the 8 experts; efsdp = 1):
fp32 losses to 1e-6 relative over 10 steps; fp64 parameters (experts, gathered to
(E, D, F), and the balancing bias) to 1e-10 and the global gradient norm of every step
to 1e-10 relative — an expert gradient summed over tp, or left un-reduced over the ep
group, moves the norm at once; the metrics.jsonl MoE records of every rank equal the
one process's (the statistics counted once per tp group, not tp times). With sequence
parallel and a capacity factor of 1 (tokens dropped on every step) in fp64. Uneven
loads: some step routes an expert far from the mean.
"""

from __future__ import annotations

import pytest

from moe_layouts import MOE, check, moe, uneven
from mp_harness import mp_runs, reference
from spawn import run_distributed

pytestmark = pytest.mark.timeout(900)


def test_moe_ep_by_tp_matches_one_process():
    runs = {"ep2xtp2": moe(tp=2, dp_shard=2, ep=2),
            "ep2xtp2 fp64": moe(tp=2, dp_shard=2, ep=2, dtype="fp64", params=True),
            "ep2xtp2+sp fp64 capacity": moe(tp=2, dp_shard=2, ep=2, sp=True, dtype="fp64",
                                            params=True,
                                            model=MOE + (("moe_capacity_factor", 1.0),))}
    outs = run_distributed(mp_runs, 4, list(runs.values()), timeout=800)
    for i, (name, spec) in enumerate(runs.items()):
        per_rank = [out[i] for out in outs]
        assert all(o["local_experts"] == [4] for o in per_rank), name  # 8 experts / ep
        check(name, spec, per_rank)
    assert uneven(reference(runs["ep2xtp2"]))
    dropped = [r["moe_dropped"]
               for r in reference(runs["ep2xtp2+sp fp64 capacity"])["moe_records"]]
    assert all(d > 0 for d in dropped), dropped
