"""Expert parallelism in HSDP replicas and with CPU offload, against one process (the
runs and checks of test_moe_ep.py: sigmoid_bias router with aux and z losses, masked
targets, uneven expert loads, accumulation; parameters, norms, biases and the logged
loads to 1e-10 in fp64, losses to 1e-6 relative in fp32 over 10 steps).

HSDP × EP on 4 ranks: parallel.dp_replicate=2, dp_shard=2, ep=2 — each replica's two
ranks split the 8 experts 4 + 4 (efsdp = 1: the DDP-replica form, the experts replicated
over the replicas, not sharded), the dense weights HSDP over (2, 2). The replicate group
must all-reduce the expert gradients (the ranks of the two replicas that own the same
experts end with equal shards, and the parameters equal one process's) and the
sigmoid_bias loads must be summed over both replicas (the logged global loads and the
bias equal one process's).

EP=2 with parallel.cpu_offload on 2 ranks: FSDP2's CPUOffloadPolicy on the dense and the
expert units alike (the experts' shards on the host, copied to the device for their
efsdp all-gather; on this CPU-only machine the copy is a no-op, so the test checks the
offload code path with the expert mesh, not the transfers).
"""

from __future__ import annotations

import torch

from spawn import run_distributed
from test_moe_ep import check_against_one_process, ep_run
import test_moe_ep

ref = test_moe_ep.ref  # the one-process fp64 / fp32 runs (module fixture)


def _hsdp(rank: int, world: int) -> list:
    return [ep_run(rank, world, dtype, 2, replicate=2) for dtype in ("fp64", "fp32")]


def test_expert_parallel_in_hsdp_replicas_matches_one_process(ref):
    per_rank = run_distributed(_hsdp, 4, timeout=400)
    assert all(r[0]["strategy"] == "hsdp" for r in per_rank)
    check_against_one_process(ref, per_rank, "hsdp2x2 ep2", 4, 1)
    # Rank r of replica 0 and rank r + 2 of replica 1 own the same 4 experts: their
    # shards were reduced over the replicas, so they are equal; the ep peers' differ.
    for dtype in (0, 1):
        shards = [r[dtype]["expert_shards"] for r in per_rank]
        for a, b in ((0, 2), (1, 3)):
            assert all(torch.equal(x, y) for x, y in zip(shards[a], shards[b])), (a, b)
        assert not any(torch.equal(x, y) for x, y in zip(shards[0], shards[1]))



def _offload(rank: int, world: int) -> list:
    return [ep_run(rank, world, dtype, 2, offload=True) for dtype in ("fp64", "fp32")]


def test_expert_parallel_with_cpu_offload_matches_one_process(ref):
    per_rank = run_distributed(_offload, 2, timeout=300)
    assert all(r[0]["offload"] and all(r[0]["offload"]) for r in per_rank)
    check_against_one_process(ref, per_rank, "ep2 cpu_offload", 2, 1)

