"""MFU of one config on this machine, and where the step's time goes.

Builds the trainer of `--config` (+ `--section.key=value` overrides), runs `--warmup`
steps (compilation, allocator), times `--steps` steps of `Trainer.train_one_step`, then
profiles one more step with torch.profiler and splits it by operator kind
(scaletrain/bench/ops.py). Prints one JSON line and a table:

- the device peak GEMM in the compute dtype (n×n `torch.mm` for n = 1024, 2048, 4096,
  metrics.measure_peak_flops), measured before AND after the timed steps; MFU uses the
  largest of them (AMX bf16 throughput varies with n), so noise on the shared cores and
  the choice of n can only lower the reported MFU, never raise it;
- the shape-matched GEMM peak (scaletrain/bench/shapes.py), a second reference line;
- tokens/s, achieved model FLOP/s, MFU = tokens/s × FLOPs/token / peak;
- seconds per step by operator category, and the top operators.

FLOPs per token: `Trainer.flops_per_token` = 6N + 12·L·d·T (models/gpt.py
gpt_flops_per_token; PaLM app. B), N = all parameters but the position table, the tied
head counted once, T = model.seq_len.

    flock /tmp/scaletrain-bench.lock .venv/bin/python bench/mfu.py \
        --config configs/gpt-10m.toml --model.vocab_size=8192 --data.vocab_size=4096 \
        --train.compile=true [--inductor cpp.weight_prepack=False] [--json out.json]

(`--data.vocab_size=4096` with `--model.vocab_size=8192` reuses the default prepared
corpus; the model, hence every FLOP, is that of the config.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scaletrain.bench.gpu_ops import profile_step_on, synchronize  # noqa: E402
from scaletrain.bench.shapes import linear_gemm_shapes, shape_matched_peak  # noqa: E402
from scaletrain.config import build_config  # noqa: E402
from scaletrain.config.dims import resolve_dims  # noqa: E402
from scaletrain.config.load import parse_overrides  # noqa: E402
from scaletrain.metrics import measure_peak_flops  # noqa: E402
from scaletrain.parallel.world import World  # noqa: E402
from scaletrain.train.runtime import detect_runtime  # noqa: E402
from scaletrain.train.trainer import Trainer  # noqa: E402


def _set_inductor(options: list[str]) -> dict:
    """`--inductor a.b=value` -> torch._inductor.config.a.b = value (Python literal)."""
    import ast

    import torch._inductor.config as ic

    done = {}
    for opt in options:
        key, raw = opt.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        obj = ic
        *path, leaf = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
        done[key] = value
    return done


def _busy_s() -> tuple[float, float]:
    """(CPU seconds all processes have used, this process's), for the noise report."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v[:8]) - v[3] - v[4]) / ticks  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system


def _peak(dt, threads: int, dev) -> float:
    sizes = (4096, 8192) if dev.type == "cuda" else (1024, 2048, 4096)
    return max(measure_peak_flops(dt, threads, dev, n=n, use_cache=False) for n in sizes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/gpt-10m.toml")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--inductor", action="append", default=[],
                    help="torch._inductor.config option KEY=VALUE (repeatable)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-shapes", action="store_true", help="skip the shape-matched peak")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args, rest = ap.parse_known_args()
    pairs, _ = parse_overrides(rest)
    inductor = _set_inductor(args.inductor)
    cfg = build_config(args.config, [("run.dir", "/tmp/scaletrain-bench-mfu"),
                                     ("run.overwrite", "true"), ("train.progress", "off"),
                                     ("train.steps", "100000"), ("schedule.warmup_steps", "0"),
                                     ("eval.interval", "0"), *pairs])
    world = World()  # one process: its runtime and layout, resolved once and handed down
    tr = Trainer(cfg, detect_runtime(cfg.train.device, cfg.train.threads, world),
                 resolve_dims(cfg.parallel, world.size))
    threads, dev = tr.rt.threads, tr.rt.device
    dt = tr.policy.compute_dtype
    dt = torch.float32 if dt == torch.float64 else dt
    peak0 = _peak(dt, threads, dev)

    tr.model.train()
    t = time.perf_counter()
    for _ in range(args.warmup):
        tr.train_one_step()
    warmup_s = time.perf_counter() - t
    # On a GPU each timed step is waited for (the trainer reads its values a step late,
    # so an unsynced step would time the queueing, not the work).
    tr.reads.flush()
    synchronize(dev)
    times, tok0 = [], tr.state.tokens
    busy0, mine0 = _busy_s()
    for _ in range(args.steps):
        t = time.perf_counter()
        tr.train_one_step()
        synchronize(dev)
        times.append(time.perf_counter() - t)
    tr.reads.flush()
    busy1, mine1 = _busy_s()
    # CPU seconds other processes took per second of our timed steps: ~0 on a quiet
    # machine; 1.0 = a whole core busy with something else (then the MFU is low).
    others = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / sum(times)
    tokens_per_step = (tr.state.tokens - tok0) / args.steps
    peak1 = _peak(dt, threads, dev)
    peak = max(peak0, peak1)
    # Best step, like the peak's best matmul: on shared cores noise only ever adds time,
    # and peak and step are then measured the same way (the median is printed too).
    step_s = min(times)
    tok_s = tokens_per_step / step_s
    fpt = tr.flops_per_token
    r = {"config": args.config, "overrides": [f"{k}={v}" for k, v in pairs],
         "inductor": inductor, "params": tr.n_params, "flops_per_token": fpt,
         "threads": threads, "interop_threads": torch.get_num_interop_threads(),
         "compute_dtype": str(dt), "tokens_per_step": tokens_per_step,
         "warmup_s": warmup_s, "step_times_s": times, "step_s": step_s,
         "step_s_median": statistics.median(times),
         "tokens_per_s": tok_s, "model_flops_per_s": tok_s * fpt,
         "peak_flops_before": peak0, "peak_flops_after": peak1, "peak_flops": peak,
         "mfu": tok_s * fpt / peak, "other_processes_cores": others,
         "load_avg": Path("/proc/loadavg").read_text().split()[:3]
         if Path("/proc/loadavg").exists() else None}
    if not args.no_shapes:
        shapes = linear_gemm_shapes(tr.model, tr.micro * cfg.model.seq_len)
        sm = shape_matched_peak(shapes, dt, threads, dev)
        r["shape_matched_peak_flops"] = sm["flops"]
        r["shape_matched_per_shape"] = sm["per_shape"]
    if not args.no_profile:
        p = profile_step_on(tr.train_one_step, dev)
        r["profile"] = p
    print(json.dumps(r))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")
    print(f"{tr.n_params / 1e6:.2f}M params, {cfg.precision.dtype}, compile="
          f"{cfg.train.compile}, micro={tr.micro}, threads={threads}; "
          f"{tokens_per_step:.0f} tok/step, step {step_s * 1e3:.0f} ms "
          f"({', '.join(f'{x * 1e3:.0f}' for x in times)}); other processes used "
          f"{others:.2f} cores meanwhile")
    print(f"peak {dt}: {peak0 / 1e9:.1f} / {peak1 / 1e9:.1f} GFLOP/s (before/after); "
          f"achieved {tok_s * fpt / 1e9:.1f} GFLOP/s; MFU {r['mfu'] * 100:.1f} %")
    if "shape_matched_peak_flops" in r:
        s = r["shape_matched_peak_flops"]
        print(f"shape-matched GEMM peak {s / 1e9:.1f} GFLOP/s "
              f"({s / peak * 100:.0f} % of peak); achieved/shape-matched "
              f"{tok_s * fpt / s * 100:.1f} %")
    if "profile" in r:
        p = r["profile"]
        print(f"profiled step {p['wall_s'] * 1e3:.0f} ms:")
        for k, v in p["ops_s"].items():
            print(f"  {k:<13} {v * 1e3:9.1f} ms  {v / p['wall_s'] * 100:5.1f} %")
        if "kernel_s" in p:
            print(f"  GPU busy {p['kernel_s'] / step_s * 100:.1f} % of the best unprofiled "
                  f"step (kernel time {p['kernel_s'] * 1e3:.1f} ms)")
        for name, s, n in p["top"][:10]:
            print(f"    {name[:60]:<60} {s * 1e3:8.1f} ms x{n}")


if __name__ == "__main__":
    main()
