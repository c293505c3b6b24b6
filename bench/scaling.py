"""Data-parallel scaling on one CPU: 1 process × 2 threads vs 2 processes × 1 thread
(DDP and FSDP2), tokens/s, and the share of the 2-process step lost to communication.

All configurations live side by side as long-running worker groups that idle on a queue;
each round runs one segment of `--steps` steps per group in turn (A, DDP, FSDP, ideal,
A'), so machine noise hits all of them alike (DESIGN.md §4). Reported: median tokens/s,
the median of per-round ratios against A, and A'/A as the noise control.

Communication share: "ideal" is one process × 1 thread running one rank's half of the
batch with no communication at all — the per-rank compute of the 2-process run. Then
comm share = 1 - t(ideal) / t(2-process step): the part of the distributed step spent in
collectives (exposed, not overlapped) and waiting for the slower rank. It slightly
overstates communication, since the ideal run has the memory bandwidth of both cores.

    .venv/bin/python bench/scaling.py [--rounds 10] [--steps 3] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))  # free_port


def worker(rank: int, world: int, port: int, threads: int, spec: dict, cmds, results):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world)})
    import torch

    from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from scaletrain.optim import build_optimizer
    from scaletrain.parallel.context import DistContext
    from scaletrain.config.dims import resolve_dims
    from scaletrain.parallel.parallelize import build_parallel_model
    from scaletrain.precision import PrecisionPolicy
    from scaletrain.optim.step_end import StepEnd
    from scaletrain.train.step import StepOptions, split_micro_batches, train_step

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    pcfg = ParallelConfig(dp_replicate=spec["dp_replicate"], dp_shard=spec["dp_shard"])
    ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), device)
    policy = PrecisionPolicy(spec["dtype"], device)
    mcfg = ModelConfig(n_layer=spec["n_layer"], n_head=spec["n_head"],
                       d_model=spec["d_model"], seq_len=spec["seq"],
                       vocab_size=spec["vocab"])
    pm = build_parallel_model(mcfg, {}, seed=0, dims=ctx.dims, mesh=ctx.mesh,
                              pcfg=pcfg, policy=policy, device=device)
    model = pm.module
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-4))
    opts, end = StepOptions(**ctx.step_options(pm)), StepEnd(grad_clip=1.0)
    per_rank = spec["batch"] // ctx.dims.dp
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, spec["vocab"], (per_rank, spec["seq"]), generator=g)
    batch = split_micro_batches((x, x.roll(-1, 1)), spec["micro"])

    def run(n: int) -> float:
        ctx.barrier()
        t = time.perf_counter()
        for _ in range(n):
            train_step(model, batch, opt, policy, None, opts, end=end)
        ctx.barrier()  # the step of the group ends when its slowest rank is done
        return time.perf_counter() - t

    run(2)  # warm-up: lazy DDP init, Adam state, allocator
    results.put(("ready", rank))
    while (n := cmds.get()) is not None:
        el = run(n)
        if rank == 0:
            results.put(("time", el))
    ctx.close()


class Group:
    """`world` worker processes of one configuration, driven by per-rank queues."""

    def __init__(self, name: str, world: int, threads: int, spec: dict):
        from spawn import free_port

        ctx = mp.get_context("spawn")
        self.name, self.results = name, ctx.Queue()
        self.cmds = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=worker, daemon=True,
                                  args=(r, world, port, threads, spec, self.cmds[r],
                                        self.results)) for r in range(world)]
        for p in self.procs:
            p.start()
        for _ in range(world):
            kind, _ = self.results.get(timeout=600)
            assert kind == "ready"

    def time(self, steps: int) -> float:
        for q in self.cmds:
            q.put(steps)
        kind, el = self.results.get(timeout=600)
        return el / steps

    def close(self) -> None:
        for q in self.cmds:
            q.put(None)
        for p in self.procs:
            p.join(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed segment")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch (samples)")
    args = ap.parse_args()
    base = dict(dtype=args.dtype, n_layer=args.n_layer, n_head=4, d_model=args.d_model,
                seq=args.seq, vocab=4096, batch=args.batch, micro=args.batch // 2)
    groups = {  # name -> (world, threads per process, layout, batch)
        "A 1p x 2t": Group("A", 1, 2, {**base, "dp_replicate": 1, "dp_shard": 1}),
        "DDP 2p x 1t": Group("DDP", 2, 1, {**base, "dp_replicate": 2, "dp_shard": 1}),
        "FSDP 2p x 1t": Group("FSDP", 2, 1, {**base, "dp_replicate": 1, "dp_shard": 2}),
        "ideal 1p x 1t, B/2": Group("ideal", 1, 1, {**base, "dp_replicate": 1,
                                                    "dp_shard": 1, "batch": args.batch // 2,
                                                    "micro": args.batch // 2}),
    }
    order = ["A 1p x 2t", "DDP 2p x 1t", "FSDP 2p x 1t", "ideal 1p x 1t, B/2", "A'"]
    times: dict[str, list[float]] = {k: [] for k in order}
    for _ in range(args.rounds):
        for k in order:
            times[k].append(groups["A 1p x 2t" if k == "A'" else k].time(args.steps))
    for g in groups.values():
        g.close()
    tokens = args.batch * args.seq
    print(f"GPT {args.n_layer}x{args.d_model}, seq {args.seq}, global batch {args.batch} "
          f"({tokens} tokens/step), {args.dtype}, {args.rounds} rounds x {args.steps} steps")
    a = times["A 1p x 2t"]
    for k in order:
        ratio = statistics.median(t0 / t for t0, t in zip(a, times[k]))
        extra = "" if not k.startswith("ideal") else "  (one rank's compute, no comm)"
        print(f"  {k:<20} {tokens / statistics.median(times[k]):9.0f} tokens/s   "
              f"speed vs A: {ratio:5.3f}{extra}")
    ideal = times["ideal 1p x 1t, B/2"]
    for k in ("DDP 2p x 1t", "FSDP 2p x 1t"):
        share = statistics.median(1 - i / t for i, t in zip(ideal, times[k]))
        print(f"  {k}: communication + waiting share of the step = {share:.1%}")


if __name__ == "__main__":
    main()
