"""`scaletrain plan`'s predicted peak memory per rank vs the peak a real run measures.

Each case is a real `scaletrain train` run (a fresh process, since peak RSS cannot be
reset), shortened to a few steps with a small seq/batch but the same code path: data
loader, step with gradient accumulation, AC, precision policy, optimizer, evaluation,
checkpoint and weight saving, on a dataset prepared beforehand (a separate `scaletrain
prepare`: the plan does not model preparation). The measured peak is summary.json's
`peak_mem_mb` (peak RSS on CPU; per rank for the 2-process layouts of
bench/model_parallel.py), the
prediction `plan(cfg, dims, vocab)["ranks"][..]["peak_bytes"]`
(scaletrain/plan/memory.py). Prints one table row per case and rank:
predicted MiB, measured MiB, error %.

    .venv/bin/python bench/plan_accuracy.py [--only NAME,...] [--with-1b] [--json OUT]

The 1B case (configs/gpt-1b.toml at seq 64, ~12 GB resident) runs only with --with-1b.
"run s" is each run's wall time, for orientation only (not a timing: no bench lock).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHORT = ["--train.steps=3", "--schedule.warmup_steps=0", "--eval.interval=0",
         "--eval.batches=1", "--eval.batch_size=2", "--eval.test=false",
         "--train.progress=off", "--train.log_interval=1", "--data.vocab_size=4096"]
G10 = ["--config", "configs/gpt-10m.toml", "--model.seq_len=128", "--train.batch_size=8"]
G125 = ["--config", "configs/gpt2-small.toml", "--model.seq_len=128",
        "--train.batch_size=4", "--train.micro_batch_size=2"]
MP = ["--config", "configs/gpt2-small.toml", "--model.seq_len=64", "--train.batch_size=4",
      "--train.micro_batch_size=1", "--precision.dtype=fp32",
      "--parallel.pp_schedule=1f1b"]
L10 = ["--config", "configs/llama-10m.toml", "--model.seq_len=128", "--train.batch_size=8"]
MOE = ["--config", "configs/moe-tiny.toml", "--train.batch_size=16"]
# A Llama-3-sized vocabulary (128256) on 2 of gpt-10m's blocks, 2048 tokens per
# micro-batch (32 x 64: a short sequence keeps the end-of-run evaluation's whole
# logits, 2 x 64 tokens, below the training head's): unchunked, the logits and their
# fp32 cross-entropy temporaries are the peak; with model.loss_chunks=8 the fused
# head's tensors (models/chunked_loss.py fused_buffer_bytes) are what plan counts.
# Session 10 (predicted / measured MiB): chunked fp32 1376 / 1543 (-10.8%), bf16 1668 /
# 1760 (-5.2%); unchunked fp32 5065 / 4172 (+21.4%). Session 11: the unchunked head
# holds 3 (N, V) fp32 tensors at its peak in fp32 and bf16 alike, not the logits + 3
# (models/losses.py cross_entropy_peak_tensors, tests/unit/test_plan_head.py): unchunked
# fp32 now predicted 4114 against the 4172 measured at glibc's malloc defaults (-1.4%).
V128K = ["--config", "configs/gpt-10m.toml", "--model.n_layer=2",
         "--model.vocab_size=128256", "--model.seq_len=64", "--train.batch_size=32",
         "--train.micro_batch_size=32"]
CASES = {  # name -> (world, overrides)
    "baseline": (1, ["--config", "configs/tiny.toml", "--model.n_layer=1",
                     "--model.d_model=16", "--model.n_head=1", "--model.seq_len=16",
                     "--train.batch_size=2"]),
    # the same on 2 FSDP2 ranks: what a distributed run holds beyond one process
    # (torch.distributed, the gloo group, torchrun's worker; CPU_DIST_BASELINE_MIB)
    "baseline-fsdp2": (2, ["--config", "configs/tiny.toml", "--model.n_layer=1",
                           "--model.d_model=16", "--model.n_head=1", "--model.seq_len=16",
                           "--train.batch_size=2", "--parallel.dp_shard=2"]),
    "10m-bf16": (1, G10 + ["--train.micro_batch_size=4"]),
    "10m-fp32": (1, G10 + ["--train.micro_batch_size=8", "--precision.dtype=fp32"]),
    "10m-pure": (1, G10 + ["--train.micro_batch_size=8", "--precision.dtype=bf16-pure"]),
    "10m-full-ac": (1, G10 + ["--train.micro_batch_size=8",
                              "--parallel.activation_checkpoint=full"]),
    "10m-sel-ac": (1, G10 + ["--train.micro_batch_size=8",
                             "--parallel.activation_checkpoint=selective"]),
    "125m-bf16": (1, G125),
    "125m-fp32-fused": (1, G125 + ["--precision.dtype=fp32", "--optim.implementation=fused"]),
    "125m-pure-sgd": (1, G125 + ["--precision.dtype=bf16-pure", "--optim.name=sgd",
                                 "--parallel.activation_checkpoint=full"]),
    "mp-ddp": (2, MP + ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "mp-tp2": (2, MP + ["--parallel.dp_shard=1", "--parallel.tp=2"]),
    "mp-pp2": (2, MP + ["--parallel.dp_shard=1", "--parallel.pp=2"]),
    "10m-8bit": (1, G10 + ["--train.micro_batch_size=8", "--optim.name=adamw8bit"]),
    "llama-10m-bf16": (1, L10 + ["--train.micro_batch_size=4"]),
    "llama-10m-fp32": (1, L10 + ["--train.micro_batch_size=8", "--precision.dtype=fp32"]),
    "llama-10m-sel-ac": (1, L10 + ["--train.micro_batch_size=8",
                                   "--parallel.activation_checkpoint=selective"]),
    "llama-10m-full-ac": (1, L10 + ["--train.micro_batch_size=8", "--precision.dtype=fp32",
                                    "--parallel.activation_checkpoint=full"]),
    "llama-fsdp2": (2, L10 + ["--train.micro_batch_size=4", "--parallel.dp_shard=2"]),
    # MoE llama (8 experts top-2, a shared expert, a dense first block): the plan measures
    # the dense and the MoE block apart; bf16 counts the per-expert weight casts
    "moe-tiny-bf16": (1, MOE + ["--train.micro_batch_size=8"]),
    "moe-tiny-fp32": (1, MOE + ["--train.micro_batch_size=16", "--precision.dtype=fp32",
                                "--model.moe_router=sigmoid_bias"]),
    # the same MoE on 2 ranks, experts split by expert parallelism (each rank holds 4
    # of the 8 experts whole, FSDP2 shards the dense weights): the per-rank expert
    # weights, their gradients and AdamW state, the all-to-all buffers
    "moe-tiny-ep2": (2, MOE + ["--train.micro_batch_size=8", "--parallel.dp_shard=2",
                               "--parallel.ep=2"]),
    "moe-tiny-fsdp2": (2, MOE + ["--train.micro_batch_size=8", "--parallel.dp_shard=2"]),
    # under TP (2 ranks): attention, dense MLP and shared expert sharded, the router and
    # the routed experts replicated over tp (their weights, gradients, AdamW state and
    # bf16 casts whole on each rank); EP x TP (4 ranks): each tp index's 2 dp_shard
    # ranks split the experts 4 + 4, replicated over tp, dense weights FSDP2 x TP
    "moe-tiny-tp2": (2, MOE + ["--train.micro_batch_size=8", "--parallel.dp_shard=1",
                               "--parallel.tp=2"]),
    "moe-tiny-ep2-tp2": (4, MOE + ["--train.micro_batch_size=8", "--parallel.dp_shard=2",
                                   "--parallel.ep=2", "--parallel.tp=2"]),
    "128k-fp32": (1, V128K + ["--precision.dtype=fp32", "--model.loss_chunks=0"]),
    "128k-fp32-chunked": (1, V128K + ["--precision.dtype=fp32", "--model.loss_chunks=8"]),
    "128k-bf16-chunked": (1, V128K + ["--model.loss_chunks=8"]),
    "1b": (1, ["--config", "configs/gpt-1b.toml", "--model.seq_len=64",
               "--train.batch_size=2", "--train.micro_batch_size=1",
               "--train.steps=2", "--optim.name=sgd", "--optim.lr=0.02",
               "--schedule.warmup_steps=0"]),  # the measured row (fp32 AdamW: 19.5 GB)
}


def _overrides(argv: list[str]):
    from scaletrain.config import parse_overrides

    over, rest = parse_overrides(argv)
    return rest[rest.index("--config") + 1], over


def predict(world: int, argv: list[str]) -> list[float]:
    """Predicted peak MiB per pipeline rank."""
    from scaletrain.config import build_config
    from scaletrain.config.dims import resolve_dims
    from scaletrain.plan.report import plan

    path, over = _overrides(argv)
    cfg = build_config(str(ROOT / path), over)
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    ranks = plan(cfg, resolve_dims(cfg.parallel, world), vocab)["ranks"]
    if len(ranks) == world:  # one rank per pipeline stage: rank i is stage i
        return [r["peak_bytes"] / 2 ** 20 if i == 0 else r["peak_bytes_other_ranks"] / 2 ** 20
                for i, r in enumerate(ranks)]
    # global rank 0 writes the weights, the others do not
    return [ranks[0]["peak_bytes"] / 2 ** 20] + \
        [ranks[0]["peak_bytes_other_ranks"] / 2 ** 20] * (world - 1)


def prepare(argv: list[str], env: dict) -> None:
    """`scaletrain prepare` with the case's config, in its own process: the measured run
    then reads the cached shards. The plan predicts training on a prepared dataset; a run
    that prepares first (a cold cache) also holds the preparation's memory (tokenizer
    training, the datatrove pipeline) in its peak RSS: +104 MiB on the 10m bf16-pure row
    here (789 vs 685 MiB), which the first case of a fresh checkout used to measure."""
    cmd = [sys.executable, "-m", "scaletrain", "prepare", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")


def measure(world: int, argv: list[str], run_dir: Path) -> tuple[list[float], float]:
    """Measured peak MiB per rank (rank order) and the wall seconds of the run, on data
    prepared beforehand (`prepare`)."""
    cmd = [sys.executable, "-m", "scaletrain", "train", *argv, f"--run.dir={run_dir}"]
    if world > 1:
        cmd += ["--nproc", str(world)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prepare(argv, env)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    ranks = sorted(s["ranks"], key=lambda r: r["rank"])
    return [r["peak_mem_mb"] for r in ranks], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--with-1b", action="store_true")
    ap.add_argument("--extra", default="", help="space-separated overrides added to every "
                    "case before its own (a case's setting wins), e.g. "
                    "--extra=--train.malloc_mmap_threshold_mib=256")
    ap.add_argument("--json", default=None)
    ap.add_argument("--predict-only", action="store_true",
                    help="print the predictions without running (seconds)")
    a = ap.parse_args()
    names = [n for n in (a.only.split(",") if a.only else CASES)
             if a.only or n != "1b" or a.with_1b]
    rows = []
    print(f"{'case':16s} {'rank':>4s} {'predicted MiB':>14s} {'measured MiB':>13s} "
          f"{'error':>8s} {'run s':>6s}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            world, argv = CASES[name]
            # --extra goes first: a case's own overrides (the 128k rows' loss_chunks)
            # win over it, and SHORT (the few steps) over both
            argv = a.extra.split() + argv + SHORT
            pred = predict(world, argv)
            if a.predict_only:
                print(f"{name:16s} " + " ".join(f"{p:.0f}" for p in pred), flush=True)
                continue
            meas, wall = measure(world, argv, Path(tmp) / name)
            for rank, m in enumerate(meas):
                p = pred[rank]
                err = 100 * (p - m) / m
                rows.append({"case": name, "rank": rank, "predicted_mib": p,
                             "measured_mib": m, "error_pct": err, "wall_s": wall})
                print(f"{name:16s} {rank:4d} {p:14.0f} {m:13.0f} {err:+7.1f}% {wall:6.0f}",
                      flush=True)
    if not rows:
        return
    worst = max(abs(r["error_pct"]) for r in rows)
    print(f"worst |error| {worst:.1f}% over {len(rows)} rows")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
