"""Where a training step of the ~10M llama spends its time, scaletrain's `Llama` beside
transformers' `LlamaForCausalLM` with the same weights (bench/llama_loops.py `hf_llama`):
the forward, loss and backward of one micro-batch plus the optimizer step (fused AdamW for
both, so that the comparison is of the model code), under torch.profiler, self CPU time
per operator summed into kinds. Interleaved A, B, A, B ... in one process on the same
batch; the step time is the median of `--rounds` rounds (CPU time of this process, less
disturbed by other processes on a shared machine than wall time), and the profile is of
one further step of each.

    flock /tmp/scaletrain-bench.lock .venv/bin/python bench/llama_ops.py \
        [--config configs/llama-10m.toml] [--micro-batch 8] [--rounds 5] [--threads 1]

The question it answers: is scaletrain's llama doing more work than transformers' for the
same step (attention through SDPA's GQA vs repeat_kv, RoPE, RMSNorm, SwiGLU, the loss)?
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from llama_loops import hf_llama  # noqa: E402 (bench/ on the path above)
from scaletrain.config import build_config  # noqa: E402
from scaletrain.models import build_model  # noqa: E402

KINDS = [  # (kind, operator-name fragments), first match wins
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention (SDPA)", ("scaled_dot_product",)),
    ("softmax / cross-entropy", ("log_softmax", "nll_loss")),
    ("optimizer", ("adam",)),
    ("copies, fills, cat", ("copy_", "fill_", "cat", "zero_", "clone", "index")),
    ("elementwise", ("mul", "add", "sub", "div", "neg", "pow", "rsqrt", "sum", "mean",
                     "silu", "cos", "sin", "exp", "where")),
]


def kind(name: str) -> str:
    return next((k for k, parts in KINDS if any(p in name for p in parts)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/llama-10m.toml")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(ROOT / args.config, [("precision.dtype", "fp32")])
    model = build_model(cfg.model, {"vocab_size": cfg.data.vocab_size}, seed=0).train()
    hf = hf_llama(model, cfg)
    B, T = args.micro_batch, cfg.model.seq_len
    x = torch.randint(0, cfg.data.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)  # T targets for scaletrain's T positions (its windows are T + 1)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for m in (model, hf)}

    def scaletrain_step():  # scaletrain's loss: summed CE / target count (train/step.py)
        (model(x, y) / y.numel()).backward()
        opts[model].step(), opts[model].zero_grad(set_to_none=True)

    def hf_step():  # transformers shifts labels = input_ids inside the model
        hf(input_ids=x, labels=x).loss.backward()
        opts[hf].step(), opts[hf].zero_grad(set_to_none=True)

    steps = {"scaletrain Llama": scaletrain_step, "transformers LlamaForCausalLM": hf_step}
    seconds = {k: [] for k in steps}
    for f in steps.values():
        f()  # warm-up: allocator, optimizer state
    for _ in range(args.rounds):
        for k, f in steps.items():
            t = time.process_time()
            f()
            seconds[k].append(time.process_time() - t)
    tables = {}
    for k, f in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            f()
        by_kind: dict[str, float] = {}
        for e in prof.key_averages():
            by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.self_cpu_time_total
        tables[k] = by_kind
    names = list(steps)
    print(f"{args.config}, micro-batch {B} x seq {T}, fp32, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"| | {' | '.join(names)} |\n|---|---:|---:|")
    print("| step CPU ms (median of rounds) | " + " | ".join(
        f"{statistics.median(seconds[k]) * 1e3:.0f}" for k in names) + " |")
    for kd in [k for k, _ in KINDS] + ["other"]:
        cells = []
        for k in names:
            total = sum(tables[k].values())
            cells.append(f"{tables[k].get(kd, 0.0) / total * 100:.1f}%")
        print(f"| {kd} (share of profiled self time) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
