"""model.loss_chunks (models/chunked_loss.py): the memory it saves and what it costs.

1. Peak memory of one micro-batch forward + backward with a 128k vocabulary (Llama 3's
   128256) and 2048 tokens, chunked vs not: each variant in a fresh process (peak RSS
   cannot be reset), the growth of its peak RSS (getrusage) over its RSS just before the
   forward — the logits, the cross-entropy temporaries, the activations and the
   gradients (the same in both). Beside it, `plan`'s activations + head (plan/memory.py
   `activation_bytes` + `head_bytes`; the fused head's tensors from models/
   chunked_loss.py `fused_buffer_bytes`: its peak is at the forward's end, before any
   gradient exists), and the logits' own fp32 size.
2. tokens/s of training steps on configs/gpt-10m.toml (its precision, one micro-batch of
   8 x 256 per step), unchunked (A), chunked (B) and a second unchunked model (A', the
   A/A control), interleaved in one process: rounds of `--steps` steps each, the
   median over rounds of B/A and A'/A (DESIGN.md §4). Same weights and batches; glibc
   tuned by `--malloc-mib` (default: train.malloc_mmap_threshold_mib's default).

    .venv/bin/python bench/chunked_loss.py [--chunks 8] [--rounds 10] [--steps 3]
    .venv/bin/python bench/chunked_loss.py --head-only   # 3. the head + loss alone
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scaletrain.config import build_config  # noqa: E402
from scaletrain.metrics import current_rss_mb  # noqa: E402
from scaletrain.models.registry import build_model  # noqa: E402
from scaletrain.plan.malloc import tune_malloc  # noqa: E402
from scaletrain.precision import PrecisionPolicy  # noqa: E402
from scaletrain.train.step import StepOptions, split_micro_batches, train_step  # noqa: E402
from scaletrain.train.step_loss import build_step_loss  # noqa: E402

MiB = 2 ** 20
BIG = dict(vocab=128256, tokens=2048, d_model=256, n_layer=2, n_head=4)


def _cfg(path: str | None, overrides: dict):
    return build_config(path, [(k, str(v)) for k, v in overrides.items()])


def memory_child(chunks: int) -> dict:
    """One forward + backward of the 128k-vocabulary GPT in this (fresh) process."""
    torch.manual_seed(0)
    cfg = _cfg(None, {"model.vocab_size": BIG["vocab"], "model.seq_len": BIG["tokens"],
                      "model.d_model": BIG["d_model"], "model.n_layer": BIG["n_layer"],
                      "model.n_head": BIG["n_head"], "model.loss_chunks": chunks,
                      "precision.dtype": "fp32"})
    model = build_model(cfg.model, {"vocab_size": BIG["vocab"]}, seed=0)
    x = torch.randint(0, BIG["vocab"], (1, BIG["tokens"]))
    y = torch.randint(0, BIG["vocab"], (1, BIG["tokens"]))
    before = current_rss_mb()
    model(x, targets=y).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"chunks": chunks, "peak_growth_mib": peak - before}


def plan_head_mib(chunks: int) -> float:
    from scaletrain.config.dims import ParallelDims
    from scaletrain.plan.report import plan

    cfg = _cfg(None, {"model.vocab_size": BIG["vocab"], "model.seq_len": BIG["tokens"],
                      "model.d_model": BIG["d_model"], "model.n_layer": BIG["n_layer"],
                      "model.n_head": BIG["n_head"], "model.loss_chunks": chunks,
                      "precision.dtype": "fp32", "train.batch_size": 1,
                      "train.micro_batch_size": 1, "train.device": "cpu"})
    rank = plan(cfg, ParallelDims(1, 1, 1, 1, 1), BIG["vocab"], "cpu")["ranks"][0]
    return rank["activation_bytes"] / MiB


def measure_memory(chunks: int) -> list[dict]:
    rows = []
    for n in (0, chunks):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["plan_activations_mib"] = plan_head_mib(n)
        rows.append(row)
    return rows


def _trainer(chunks: int, batch: tuple):
    cfg = _cfg(str(ROOT / "configs" / "gpt-10m.toml"),
               {"model.vocab_size": 8192, "model.loss_chunks": chunks})
    model = build_model(cfg.model, {"vocab_size": 8192}, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    policy = PrecisionPolicy(cfg.precision.dtype, torch.device("cpu"))
    loss = build_step_loss(loss_in_model=True)  # the in-model head (+ chunks) as runs use
    micro = split_micro_batches(batch, cfg.train.micro_batch_size)

    def step():
        train_step(model, micro, opt, policy, None, StepOptions(), step_loss=loss)
    return step, cfg


def measure_speed(chunks: int, rounds: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 8192, (8, 256), generator=g),
             torch.randint(0, 8192, (8, 256), generator=g))
    variants = {"A": _trainer(0, batch)[0], "B": _trainer(chunks, batch)[0],
                "A'": _trainer(0, batch)[0]}
    for fn in variants.values():  # warm-up: allocator, Adam state
        fn()
        fn()
    times = {k: [] for k in variants}
    order = list(variants)
    for r in range(rounds):
        for k in order[r % 3:] + order[:r % 3]:  # rotate who goes first
            t0 = time.perf_counter()
            for _ in range(steps):
                variants[k]()
            times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    tokens = 8 * 256 * steps
    b_over_a = statistics.median(a / b for a, b in zip(times["A"], times["B"]))
    aa = statistics.median(a / b for a, b in zip(times["A"], times["A'"]))
    return {"tokens_per_s_unchunked": tokens / statistics.median(times["A"]),
            "tokens_per_s_chunked": tokens / statistics.median(times["B"]),
            "chunked_over_unchunked": b_over_a, "a_a_control": aa,
            "rounds": rounds, "steps_per_round": steps, "chunks": chunks}


def measure_head(chunks: int, rounds: int) -> dict:
    """The head + loss alone at gpt-10m's shape (8 x 256 tokens, D 384, V 8192, bf16
    autocast), forward + backward: unchunked (A, A') vs chunked (B), interleaved."""
    from scaletrain.models.chunked_loss import chunked_head_loss
    from scaletrain.models.losses import sum_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 256, 384, generator=g, requires_grad=True)
    head = torch.nn.Linear(384, 8192, bias=False)
    y = torch.randint(0, 8192, (8, 256), generator=g)

    def plain():
        with torch.autocast("cpu", torch.bfloat16):
            loss = sum_cross_entropy(head(h), y)
        loss.backward()

    def chunked():
        with torch.autocast("cpu", torch.bfloat16):
            loss = chunked_head_loss(lambda t: t, head, h, y, chunks)
        loss.backward()
    variants = {"A": plain, "B": chunked, "A'": plain}
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    order = list(variants)
    for r in range(rounds):
        for k in order[r % 3:] + order[:r % 3]:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    return {"chunked_over_unchunked": statistics.median(
                a / b for a, b in zip(times["A"], times["B"])),
            "a_a_control": statistics.median(a / b for a, b in zip(times["A"], times["A'"])),
            "unchunked_s": statistics.median(times["A"]),
            "chunked_s": statistics.median(times["B"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--malloc-mib", type=int,
                    default=build_config(None, []).train.malloc_mmap_threshold_mib,
                    help="train.malloc_mmap_threshold_mib for the speed runs (default: "
                    "scaletrain's default; 0 = glibc's own allocator behaviour)")
    ap.add_argument("--head-only", action="store_true",
                    help="time the head + loss alone (fast; no memory, no full steps)")
    a = ap.parse_args()
    if a.memory_child is not None:
        torch.set_num_threads(1)
        print(json.dumps(memory_child(a.memory_child)))
        return
    if a.head_only:
        s = measure_head(a.chunks, max(a.rounds, 10))
        print(f"head + loss alone (gpt-10m shape, bf16), {max(a.rounds, 10)} rounds: "
              f"unchunked {s['unchunked_s']:.3f} s, loss_chunks={a.chunks} "
              f"{s['chunked_s']:.3f} s; median chunked/unchunked speed "
              f"{s['chunked_over_unchunked']:.3f}, A/A {s['a_a_control']:.3f}")
        return
    if not a.skip_memory:
        logits_mib = BIG["tokens"] * BIG["vocab"] * 4 / MiB
        print(f"peak memory, one fwd+bwd, vocab {BIG['vocab']}, {BIG['tokens']} tokens, "
              f"fp32 (fp32 logits alone: {logits_mib:.0f} MiB)")
        for row in measure_memory(a.chunks):
            print(f"  loss_chunks={row['chunks']:<3} peak RSS growth "
                  f"{row['peak_growth_mib']:7.0f} MiB   plan activations+head "
                  f"{row['plan_activations_mib']:7.0f} MiB")
    if not a.skip_speed:
        tuned = tune_malloc(a.malloc_mib)  # as a run's trainer does (train/trainer.py)
        s = measure_speed(a.chunks, a.rounds, a.steps)
        print(f"gpt-10m (bf16, 8 x 256 per step, malloc threshold "
              f"{a.malloc_mib if tuned else 0} MiB), {s['rounds']} rounds x "
              f"{s['steps_per_round']} steps: unchunked {s['tokens_per_s_unchunked']:.0f} "
              f"tok/s, loss_chunks={a.chunks} {s['tokens_per_s_chunked']:.0f} tok/s; "
              f"median chunked/unchunked {s['chunked_over_unchunked']:.3f}, "
              f"A/A {s['a_a_control']:.3f}")


if __name__ == "__main__":
    main()
