"""Training throughput (tokens/s) of fp32 vs bf16 autocast vs bf16-pure, side by side.

The ~10M-parameter GPT of configs/gpt-10m.toml (6 layers, d_model 384, 6 heads,
seq_len 256, vocab 8192), one scaletrain `train_step` per step (forward, fp32 loss,
backward, clip, AdamW) with each precision policy; bf16-pure includes its fp32 master
weights. Data are random token ids: throughput does not depend on their values, and the
8192-token BPE of the real corpus would take minutes to prepare.

Each round times a segment of `--steps` steps of every mode, in a rotating order (so
drift does not favour one), plus a second fp32 model as an A/A noise control. Reported:
the median over rounds of the per-round tokens/s ratio to fp32 (DESIGN.md §4).

    .venv/bin/python bench/precision.py [--rounds 10] [--steps 2] [--batch 8]
        [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scaletrain.config import build_config  # noqa: E402
from scaletrain.metrics import measure_peak_flops  # noqa: E402
from scaletrain.models import build_model, count_params  # noqa: E402
from scaletrain.optim import build_optimizer  # noqa: E402
from scaletrain.precision import PrecisionPolicy  # noqa: E402
from scaletrain.optim.step_end import StepEnd  # noqa: E402
from scaletrain.train.step import StepOptions, split_micro_batches, train_step  # noqa: E402

MODES = ("fp32", "bf16", "bf16-pure", "fp32-control")
VOCAB = 8192


class Runner:
    """One model + optimizer + policy; `segment(n)` runs n steps and returns seconds."""

    def __init__(self, cfg, mode: str, batch: int, micro: int, device: torch.device):
        self.policy = PrecisionPolicy(mode.removesuffix("-control"), device)
        self.model = build_model(cfg.model, {"vocab_size": VOCAB}, seed=cfg.train.seed,
                                 device=device, dtype=self.policy.param_dtype).train()
        self.device = device
        self.opt = build_optimizer(self.model, cfg.optim,
                                   master_weights=self.policy.master_weights)
        self.end = StepEnd(grad_clip=cfg.train.grad_clip)
        self.batch, self.micro, self.seq = batch, micro, cfg.model.seq_len
        self.gen = torch.Generator().manual_seed(0)

    def segment(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            x = torch.randint(0, VOCAB, (self.batch, self.seq + 1), generator=self.gen)
            x = x.to(self.device)
            mb = split_micro_batches((x[:, :-1], x[:, 1:]), self.micro)
            train_step(self.model, mb, self.opt, self.policy, None, StepOptions(),
                       end=self.end)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/gpt-10m.toml")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed segment")
    ap.add_argument("--batch", type=int, default=8, help="samples per step")
    ap.add_argument("--micro", type=int, default=8, help="samples per forward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = build_config(args.config, [("model.vocab_size", str(VOCAB))])
    runners = {m: Runner(cfg, m, args.batch, args.micro, device) for m in MODES}
    for r in runners.values():  # warm-up: allocator, kernels, optimizer state
        r.segment(1)
    tokens = args.steps * args.batch * cfg.model.seq_len
    tok_s = {m: [] for m in MODES}
    for i in range(args.rounds):
        order = MODES[i % len(MODES):] + MODES[:i % len(MODES)]
        for m in order:
            tok_s[m].append(tokens / runners[m].segment(args.steps))
    n = count_params(runners["fp32"].model)
    print(f"GPT {n / 1e6:.2f}M params (seq {cfg.model.seq_len}, vocab {VOCAB}), batch "
          f"{args.batch} x micro {args.micro}, {device}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps")
    peak = {dt: measure_peak_flops(dt, torch.get_num_threads(), device, use_cache=False) / 1e9
            for dt in (torch.float32, torch.bfloat16)}
    print(f"matmul peak: fp32 {peak[torch.float32]:.0f} GFLOP/s, "
          f"bf16 {peak[torch.bfloat16]:.0f} GFLOP/s")
    for m in MODES:
        ratio = statistics.median(a / b for a, b in zip(tok_s[m], tok_s["fp32"]))
        print(f"{m:13s} median {statistics.median(tok_s[m]):9.0f} tokens/s   "
              f"ratio to fp32 (median of rounds) {ratio:.3f}")


if __name__ == "__main__":
    main()
