"""Peak memory per rank of the ~125M GPT (configs/gpt2-small.toml shape): DDP vs FSDP2
on 2 ranks, with and without activation checkpointing; bytes per parameter against the
ZeRO paper's 16 B/param (mixed-precision Adam: 2 fp16 params + 2 fp16 grads + 4 fp32
master + 4 + 4 Adam moments; Rajbhandari et al. 2020, §3.1) and 16/N for stage 3.

Our bf16 policy keeps fp32 parameters (4 B) and fp32 gradients (4 B) plus AdamW's two
fp32 moments (8 B): also 16 B/param of model state, with bf16 copies only transient
(autocast / FSDP's gathered bf16 unit). Two numbers per rank:

- `states`: bytes of the parameters, gradients and optimizer state this rank holds,
  counted from the tensors themselves (DTensor shards: local part) — exact;
- `peak`: growth of the process's peak RSS (getrusage) over its RSS after start-up and
  process-group init — model states + activations + communication buffers + allocator
  slack + the transient full tensor of the seeded init (one parameter at a time).

Each configuration runs in fresh processes (peak RSS cannot be reset), 2 steps
(the first allocates the Adam moments), one thread per rank, gloo.

    .venv/bin/python bench/memory.py [--seq 256] [--micro 4] [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))  # the N-process spawn helper

import torch  # noqa: E402

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from scaletrain.metrics import current_rss_mb, peak_memory_mb  # noqa: E402
from scaletrain.optim import build_optimizer  # noqa: E402
from scaletrain.parallel.context import DistContext  # noqa: E402
from scaletrain.config.dims import resolve_dims  # noqa: E402
from scaletrain.parallel.parallelize import build_parallel_model  # noqa: E402
from scaletrain.precision import PrecisionPolicy  # noqa: E402
from scaletrain.optim.step_end import StepEnd  # noqa: E402
from scaletrain.train.step import StepOptions, split_micro_batches, train_step  # noqa: E402
from spawn import run_distributed  # noqa: E402

VOCAB = 50304  # configs/gpt2-small.toml


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def mem_run(rank: int, world: int, spec: dict) -> dict:
    device = torch.device("cpu")
    pcfg = ParallelConfig(dp_replicate=spec["dp_replicate"], dp_shard=spec["dp_shard"],
                          activation_checkpoint=spec["ac"])
    ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), device)
    baseline = current_rss_mb()
    policy = PrecisionPolicy("bf16", device)
    mcfg = ModelConfig(n_layer=12, n_head=12, d_model=768, seq_len=spec["seq"],
                       vocab_size=VOCAB)
    pm = build_parallel_model(mcfg, {}, seed=0, dims=ctx.dims, mesh=ctx.mesh, pcfg=pcfg,
                              policy=policy, device=device)
    model = pm.module
    n_params = sum(p.numel() for p in model.parameters())  # global (DTensor numel)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-4))
    opts, end = StepOptions(**ctx.step_options(pm)), StepEnd(grad_clip=1.0)
    g = torch.Generator().manual_seed(rank)
    per_rank = spec["micro"] * spec["accum"]
    for _ in range(spec["steps"]):
        x = torch.randint(0, VOCAB, (per_rank, spec["seq"]), generator=g)
        train_step(model, split_micro_batches((x, x.roll(-1, 1)), spec["micro"]), opt,
                   policy, None, opts, end=end)
    params = sum(_local_bytes(p) for p in model.parameters())
    optim = sum(_local_bytes(v) for st in opt.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0)
    grads = params  # fp32 gradients, same sharding as the parameters (freed by zero_grad)
    return {"n_params": n_params, "states_mb": (params + grads + optim) / 2**20,
            "peak_mb": peak_memory_mb(device) - baseline, "baseline_mb": baseline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4, help="samples per forward per rank")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--configs", default="single,ddp,ddp+full,fsdp,fsdp+full,fsdp+selective")
    args = ap.parse_args()
    layouts = {"single": (1, 1, 1), "ddp": (2, 2, 1), "fsdp": (2, 1, 2)}  # world, rep, shard
    print(f"GPT 12x768, vocab {VOCAB}, seq {args.seq}, micro-batch {args.micro} per rank, "
          f"bf16 autocast + fp32 AdamW, {args.steps} steps, 1 thread per rank, gloo")
    print(f"{'config':<16} {'rank':>4} {'states MiB':>10} {'B/param':>8} {'peak MiB':>9} "
          f"{'peak B/param':>12}  ZeRO ref (16 B/param; 16/N)")
    for name in args.configs.split(","):
        layout, _, ac = name.partition("+")
        world, rep, shard = layouts[layout]
        spec = dict(dp_replicate=rep, dp_shard=shard, ac=ac or "none", seq=args.seq,
                    micro=args.micro, accum=1, steps=args.steps)
        outs = run_distributed(mem_run, world, spec, timeout=900)
        for r, o in enumerate(outs):
            n = o["n_params"]
            ref = 16 / world if layout == "fsdp" else 16
            print(f"{name:<16} {r:>4} {o['states_mb']:>10.0f} "
                  f"{o['states_mb'] * 2**20 / n:>8.2f} {o['peak_mb']:>9.0f} "
                  f"{o['peak_mb'] * 2**20 / n:>12.2f}  {ref:g}   (N={n / 1e6:.1f}M params)",
                  flush=True)


if __name__ == "__main__":
    main()
