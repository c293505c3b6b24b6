"""Expert parallelism on this CPU: tokens/s of configs/moe-tiny.toml (8 experts, top-2,
d_model 128, seq_len 128; global batch 16 sequences per step) trained as

    one    one process (2 intra-op threads: the whole machine)
    fsdp2  FSDP2 on 2 processes (1 thread each): experts sharded like dense weights
    ep2    EP=2 on 2 processes (parallel.dp_shard=2, parallel.ep=2): dense weights FSDP2,
           each rank owns 4 experts, tokens exchanged by two all-to-alls per MoE layer

Each layout runs in freshly spawned processes (gloo), `--rounds` rounds interleaved
(ep2, fsdp2, one, fsdp2', ...); per round the median step time after a warm-up step;
ratios are medians of per-round ratios, with an A/A control (fsdp2 vs fsdp2' in the same
round).

    PYTHONPATH=. .venv/bin/python bench/moe_ep.py [--rounds 3] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "distributed"))

import torch  # noqa: E402

from spawn import run_distributed  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
BATCH = 16


def _config(layout: str):
    from scaletrain.config.load import build_config

    over = {"one": {"parallel.dp_shard": 1}, "fsdp2": {"parallel.dp_shard": 2},
            "ep2": {"parallel.dp_shard": 2, "parallel.ep": 2}}[layout]
    return build_config(os.path.join(ROOT, "configs", "moe-tiny.toml"),
                        [(k, str(v)) for k, v in over.items()])


def bench_run(rank: int, world: int, layout: str, steps: int) -> list[float]:
    """Median-able step times (s) of `steps` steps after one warm-up step."""
    from scaletrain.config.dims import resolve_dims
    from scaletrain.optim import build_optimizer
    from scaletrain.optim.step_end import StepEnd
    from scaletrain.parallel.context import DistContext
    from scaletrain.parallel.parallelize import build_parallel_model
    from scaletrain.precision import PrecisionPolicy
    from scaletrain.train.step import StepOptions, train_step

    if world == 1:
        torch.set_num_threads(2)
    cfg = _config(layout)
    device = torch.device("cpu")
    ctx = DistContext.setup(cfg.parallel, rank, resolve_dims(cfg.parallel, world), device)
    policy = PrecisionPolicy("fp32", device)
    V = cfg.data.vocab_size
    pm = build_parallel_model(cfg.model, {"vocab_size": V}, seed=0, dims=ctx.dims,
                              mesh=ctx.mesh, pcfg=cfg.parallel, policy=policy,
                              device=device, expert_mesh=ctx.expert_mesh)
    opt = build_optimizer(pm.module, cfg.optim)
    opts = StepOptions(**ctx.step_options(pm))
    end = StepEnd(grad_clip=1.0)
    g = torch.Generator().manual_seed(rank)
    n = BATCH // world
    times = []
    with ctx.guard():
        for _ in range(steps + 1):
            x = torch.randint(0, V, (n, cfg.model.seq_len), generator=g)
            y = torch.randint(0, V, (n, cfg.model.seq_len), generator=g)
            t0 = time.perf_counter()
            train_step(pm.module, [(x, y)], opt, policy, None, opts, end=end)
            times.append(time.perf_counter() - t0)
    return times[1:]


def measure(layout: str, steps: int) -> float:
    """tokens/s of one spawned run of `layout` (the slowest rank's median step)."""
    world = 1 if layout == "one" else 2
    per_rank = run_distributed(bench_run, world, layout, steps, timeout=600)
    step = max(statistics.median(t) for t in per_rank)
    return BATCH * _config(layout).model.seq_len / step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    rows = []
    for r in range(a.rounds):
        got = {name: measure(name.rstrip("'"), a.steps) for name in ("ep2", "fsdp2", "one",
                                                                      "fsdp2'")}
        rows.append(got)
        print(f"round {r}: " + "  ".join(f"{k} {v:,.0f} tok/s" for k, v in got.items()),
              flush=True)

    def ratio(a_, b_):
        return statistics.median(row[a_] / row[b_] for row in rows)

    print("median tokens/s: " + "  ".join(
        f"{k} {statistics.median(row[k] for row in rows):,.0f}" for k in rows[0]))
    print(f"ep2 / one      {ratio('ep2', 'one'):.2f}x")
    print(f"ep2 / fsdp2    {ratio('ep2', 'fsdp2'):.2f}x")
    print(f"fsdp2 / one    {ratio('fsdp2', 'one'):.2f}x")
    aa = ratio("fsdp2'", "fsdp2")
    print(f"A/A fsdp2'/fsdp2 {aa:.2f}x")


if __name__ == "__main__":
    main()
