"""scaletrain's training step against a minimal hand-written PyTorch loop.

Same model (same init), same data order, same optimizer (AdamW, same groups), same
gradient clipping and micro-batching; the hand loop is what a careful user writes in 15
lines. Segments of `--steps` steps alternate A (scaletrain) / B (hand loop) for `--pairs`
pairs; we report the median of per-pair time ratios A/B and, as a noise control, the
median ratio of two interleaved scaletrain segments (A/A'). DESIGN.md §4.

    .venv/bin/python bench/overhead.py [--config configs/tiny.toml] [--pairs 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scaletrain.bench.handloop import HandLoop  # noqa: E402  (also used by `scaletrain bench`)
from scaletrain.config import build_config  # noqa: E402
from scaletrain.config.dims import resolve_dims  # noqa: E402
from scaletrain.config.load import parse_overrides  # noqa: E402
from scaletrain.parallel.world import World  # noqa: E402
from scaletrain.train.runtime import detect_runtime  # noqa: E402
from scaletrain.train.trainer import Trainer  # noqa: E402


def timed(fn, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed segment")
    ap.add_argument("--hand-compile-loss", action="store_true",
                    help="with train.compile, the hand loop compiles its loss too")
    args, rest = ap.parse_known_args()
    pairs, _ = parse_overrides(rest)
    cfg = build_config(args.config, [("run.dir", "/tmp/scaletrain-bench-overhead"),
                                     ("run.overwrite", "true"), ("train.progress", "off"),
                                     ("train.steps", "100000"), ("schedule.warmup_steps", "0"),
                                     *pairs])
    world = World()  # one process: its runtime and layout, resolved once and handed down
    a = Trainer(cfg, detect_runtime(cfg.train.device, cfg.train.threads, world),
                resolve_dims(cfg.parallel, world.size))
    a_step = lambda: a.train_one_step()  # noqa: E731
    b = HandLoop(a, compile_loss=args.hand_compile_loss)
    for _ in range(3):  # warm-up: allocator, kernels, first-touch of the memory map
        a_step(), b.step()
    ratios, controls, ta_all, tb_all = [], [], [], []
    for i in range(args.pairs):
        # Alternate which side goes first, so slow drift does not favour one of them.
        if i % 2 == 0:
            ta, tb, ta2 = timed(a_step, args.steps), timed(b.step, args.steps), \
                timed(a_step, args.steps)
        else:
            ta2, tb, ta = timed(a_step, args.steps), timed(b.step, args.steps), \
                timed(a_step, args.steps)
        ratios.append(ta / tb)
        controls.append(ta / ta2)
        ta_all.append(ta), tb_all.append(tb)
    print(f"config {args.config} {' '.join(rest)}: {a.n_params / 1e6:.2f}M params, "
          f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"{args.pairs} pairs x {args.steps} steps, hand loop compiles its loss: "
          f"{args.hand_compile_loss and cfg.train.compile}, load avg "
          f"{open('/proc/loadavg').read().split()[:3]}")
    print(f"scaletrain step  median {statistics.median(ta_all) * 1e3:8.2f} ms")
    print(f"hand loop step   median {statistics.median(tb_all) * 1e3:8.2f} ms")
    print(f"ratio scaletrain / hand loop (median of pairs): {statistics.median(ratios):.4f}")
    print(f"A/A control (median of pairs):                  {statistics.median(controls):.4f}")
    # Noise-free view of the same question: what each loop does per step besides the
    # shared model math — ATen calls and time outside any operator (Python, glue).
    from scaletrain.bench.ops import profile_step

    for name, fn in (("scaletrain", a_step), ("hand loop", b.step)):
        p = profile_step(fn)
        print(f"profiled {name:<10} step {p['wall_s'] * 1e3:8.1f} ms, {p['aten_ops']:6.0f} "
              f"ATen calls, outside operators {p['ops_s']['framework'] * 1e3:7.1f} ms, "
              f"optimizer {p['ops_s']['optimizer'] * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
