"""The MoE llama of the TP and EP × TP layout tests (test_moe_tp.py, test_moe_ep_tp.py)
and their one check against one process (mp_harness.py `reference`): every rank's
losses and metrics.jsonl MoE records; in fp64 the gradient norms and the union of the
ranks' parameters too.

Model: block 0 dense, block 1 MoE with 8 experts top-2, one shared expert, the
sigmoid_bias router with aux and z losses on; masked targets give ranks unequal target
counts.
"""

from __future__ import annotations

import pytest

from mp_harness import mp_spec, reference

MOE = (("name", "llama"), ("n_kv_head", 2), ("moe_experts", 8), ("moe_top_k", 2),
       ("moe_d_ff", 16), ("moe_shared_experts", 1), ("moe_first_dense", 1),
       ("moe_router", "sigmoid_bias"), ("moe_aux_loss", 0.1), ("moe_z_loss", 0.01),
       ("moe_bias_update_rate", 0.01))
LOSS_RTOL, PARAM_ATOL = 1e-6, 1e-10


def moe(**kw) -> dict:
    return mp_spec(**{"steps": 10, "n_head": 4, "masked": True, "model": MOE, **kw})


def check(name: str, spec: dict, outs: list[dict]) -> dict:
    """Every rank's losses and MoE records against the one-process run's; in fp64 the
    gradient norms and (the union of the ranks') parameters too. Returns the gaps."""
    ref = reference(spec)
    fp64 = spec["dtype"] == "fp64"
    got = {"loss_rel": 0.0}
    for rank, out in enumerate(outs):
        rel = max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], out["losses"]))
        assert len(out["losses"]) == spec["steps"]
        assert rel <= (1e-12 if fp64 else LOSS_RTOL), f"{name} rank {rank}: loss rel {rel:.2e}"
        got["loss_rel"] = max(got["loss_rel"], rel)
        for step, (a, b) in enumerate(zip(ref["moe_records"], out["moe_records"]), 1):
            assert b["moe_load"] == a["moe_load"], (name, rank, step)
            assert b["moe_dropped"] == a["moe_dropped"]
            for key in ("moe_aux_loss", "moe_z_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-12 if fp64 else 1e-5), \
                    (name, rank, step, key)
        if fp64:
            n = max(abs(a - b) / a for a, b in zip(ref["norms"], out["norms"]))
            assert n <= 1e-10, f"{name} rank {rank}: grad norm rel {n:.2e}"
            got["norm_rel"] = max(got.get("norm_rel", 0.0), n)
    if spec["params"]:
        diff, seen = 0.0, set()
        for out in outs:
            for k, v in out["params"].items():
                diff = max(diff, (v - ref["params"][k]).abs().max().item())
                seen.add(k)
        assert seen == set(ref["params"]), (name, set(ref["params"]) ^ seen)
        assert ref["params"]["blocks.1.mlp.expert_bias"].abs().sum() > 0  # the bias moved
        assert diff <= PARAM_ATOL, f"{name}: parameters differ by {diff:.3g}"
        got["param_diff"] = diff
    print(f"{name}: {got}")  # the report's measured numbers (pytest -s)
    return got


def uneven(ref: dict) -> bool:
    """Some step routed an expert far from the mean load (max / mean >= 1.5)."""
    return any(r["moe_imbalance"]["1"] >= 1.5 for r in ref["moe_records"])
