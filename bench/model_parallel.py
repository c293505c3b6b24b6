"""Model parallelism on 2 processes: DDP vs TP=2 vs PP=2 (1F1B) for the ~125M GPT-2
shape (configs/gpt2-small.toml; seq_len and steps shortened for a 2-core CPU).

Per layout and rank: peak resident memory above the process's baseline (measured after
imports and the process-group set-up, before the model is built), median step time, and
for PP the measured pipeline bubble — 1 − (this stage's compute for the step's m
micro-batches, timed alone without communication) / (step time) — against the formula
(p−1)/(m+p−1). `scaletrain plan`'s predicted peak is checked against real `scaletrain
train` runs of the same layouts by bench/plan_accuracy.py (its mp-* rows): this script's
bare step loop has no evaluation or end-of-run save, which the plan's peak includes.

Layouts run in separate spawned process pairs (peak RSS cannot be reset within a
process), alternated over `--rounds` rounds (DDP, TP, PP, DDP, ...); step-time ratios are
medians of per-round ratios, with an A/A control (DDP round r vs round r+1).

    PYTHONPATH=. .venv/bin/python bench/model_parallel.py [--rounds 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "distributed"))

import torch  # noqa: E402

LAYOUTS = {"ddp": dict(dp_replicate=2, dp_shard=1, tp=1, pp=1),
           "tp2": dict(dp_replicate=1, dp_shard=1, tp=2, pp=1),
           "pp2": dict(dp_replicate=1, dp_shard=1, tp=1, pp=2)}


def _config(layout: str, seq_len: int, batch: int, micro: int):
    from scaletrain.config.load import build_config

    root = os.path.join(os.path.dirname(__file__), "..")
    over = {f"parallel.{k}": v for k, v in LAYOUTS[layout].items()}
    over.update({"model.seq_len": seq_len, "model.vocab_size": 50304, "model.dropout": 0.0,
                 "train.batch_size": batch, "train.micro_batch_size": micro,
                 "precision.dtype": "fp32", "parallel.pp_schedule": "1f1b"})
    return build_config(os.path.join(root, "configs", "gpt2-small.toml"),
                        [(k, str(v)) for k, v in over.items()])


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(rank: int, world: int, layout: str, seq_len: int, batch: int, micro: int,
         steps: int) -> dict:
    from scaletrain.optim import build_optimizer
    from scaletrain.parallel.context import DistContext
    from scaletrain.config.dims import resolve_dims
    from scaletrain.parallel.model_parallel import build_pipeline
    from scaletrain.parallel.parallelize import build_parallel_model
    from scaletrain.parallel.pipeline import bubble_fraction
    from scaletrain.precision import PrecisionPolicy
    from scaletrain.optim.step_end import StepEnd
    from scaletrain.train.step import StepOptions, split_micro_batches, train_step
    from scaletrain.train.step_loss import build_step_loss

    cfg = _config(layout, seq_len, batch, micro)
    dev = torch.device("cpu")
    ctx = DistContext.setup(cfg.parallel, rank, resolve_dims(cfg.parallel, world), dev)
    V = cfg.model.vocab_size
    base = _rss_mb()
    policy = PrecisionPolicy("fp32", dev)
    pm = build_parallel_model(cfg.model, {"vocab_size": V}, seed=0, dims=ctx.dims,
                              mesh=ctx.mesh, pcfg=cfg.parallel, policy=policy, device=dev)
    model = pm.module
    dp = ctx.dims.dp
    loss = build_step_loss(loss_parallel=pm.tp_loss_parallel)
    pipe = build_pipeline(pm, ctx, cfg.parallel, batch // dp, micro, cfg.model, V,
                          torch.float32, loss)
    opt = build_optimizer(model, cfg.optim, embedding_copies=pm.tied_copies)
    opts, end = StepOptions(**ctx.step_options(pm)), StepEnd(grad_clip=1.0)
    g = torch.Generator().manual_seed(ctx.dp_rank)
    times = []
    for i in range(steps):
        x = torch.randint(0, V, (batch // dp, seq_len), generator=g)
        micro_batches = split_micro_batches((x, torch.roll(x, -1, 1)), micro)
        ctx.barrier()
        t0 = time.perf_counter()
        if pipe is not None:
            pipe.step(micro_batches, opt, policy, opts, end)
        else:
            train_step(model, micro_batches, opt, policy, None, opts, step_loss=loss, end=end)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    out = {"layout": layout, "rank": rank, "step_s": step_s,
           "peak_mb": _rss_mb() - base, "base_mb": base,
           "bubble_formula": bubble_fraction(cfg.parallel.pp_schedule, ctx.dims.pp,
                                             batch // dp // micro, 1)}
    if pipe is not None:
        out["bubble_measured"] = 1 - _stage_compute_s(pipe, cfg, micro) / step_s
    return out


def _stage_compute_s(pipe, cfg, micro: int) -> float:
    """This rank's forward + backward of its stage for the step's micro-batches, alone."""
    m = pipe.microbatches
    mod = pipe.views[0]
    T, D, V = cfg.model.seq_len, cfg.model.d_model, cfg.model.vocab_size
    t = 0.0
    for _ in range(2):  # warm, then timed
        t0 = time.perf_counter()
        for _ in range(m):
            if pipe.first:
                inp = torch.randint(0, V, (micro, T))
            else:
                inp = torch.randn(micro, T, D, requires_grad=True)
            y = mod(inp)
            y.backward(torch.randn_like(y) * 1e-3)
        t = time.perf_counter() - t0
        mod.zero_grad(set_to_none=True)
    return t


def main() -> None:
    from spawn import run_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--micro", type=int, default=1)
    a = ap.parse_args()
    res: dict = {k: [] for k in LAYOUTS}
    for r in range(a.rounds):
        for layout in LAYOUTS:
            out = run_distributed(_run, 2, layout, a.seq_len, a.batch, a.micro, a.steps,
                                  timeout=900)
            res[layout].append(out)
            for o in out:
                print(f"round {r} {layout} rank {o['rank']}: step {o['step_s']:.3f} s, "
                      f"peak +{o['peak_mb']:.0f} MiB (baseline {o['base_mb']:.0f})"
                      + (f", bubble measured {o['bubble_measured']:.3f} vs formula "
                         f"{o['bubble_formula']:.3f}" if "bubble_measured" in o else ""),
                      flush=True)
    step = {k: [max(o["step_s"] for o in rr) for rr in v] for k, v in res.items()}
    print("median step-time ratio vs DDP (per round):")
    for k in ("tp2", "pp2"):
        print(f"  {k}/ddp = {statistics.median(a_ / b for a_, b in zip(step[k], step['ddp'])):.3f}")
    if a.rounds > 1:
        print(f"  A/A ddp(round r+1)/ddp(round r) = "
              f"{statistics.median(b / a_ for a_, b in zip(step['ddp'], step['ddp'][1:])):.3f}")


if __name__ == "__main__":
    main()
