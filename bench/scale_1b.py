"""A GPT of >= 1.0 billion parameters trained for a few optimizer steps on 2 cores, 24 GiB.

Shape (default): 24 layers, d_model 2048, 16 heads, seq 1024, byte-level vocab 256 ->
24 * 12 * 2048^2 + (256 + 1024) * 2048 + LayerNorms = 1.21 B parameters.

Memory arithmetic (bytes per parameter, N = 1.21e9):
  fp32 AdamW, fp32 params          4 + 4 grad + 8 states          = 16 B -> 19.4 GB  (no)
  bf16 params + fp32 master + Adam 2 + 2 grad + 4 master + 8      = 16 B -> 19.4 GB  (no:
                                   the machine is shared, ~21 GB free)
  bf16-pure AdamW (states in bf16) 2 + 2 grad + 2 + 2 states      =  8 B ->  9.7 GB  (fits)
  bf16-pure SGD (no state)         2 + 2 grad                     =  4 B ->  4.8 GB  (used)
torch.optim.AdamW keeps exp_avg / exp_avg_sq as `zeros_like(param)`, i.e. bf16 here
(the "bf16-pure" policy of scaletrain.precision). No 8-bit optimizer: torchao is not
installed in this environment. Activations: full activation checkpointing per block
(scaletrain.parallel.ac) keeps one (B, T, D) bf16 input per block (24 * 1024 * 2048 * 2 B
= 0.1 GB at micro-batch 1) plus one block's recompute at a time; the (T, V) logits are
tiny with V = 256. Micro-batch 1 with gradient accumulation over `--accum` micro-batches.

Data: the bytes of this repository's text files (README, sources): real text. The same
`--accum` windows form the batch of every step (an "overfit one batch" check), so the loss
of consecutive steps is comparable and must fall from about ln(256) = 5.55; fresh windows
each step would add batch-to-batch noise larger than 3 steps' progress.

Learning rate, no warm-up, measured: Adam's first update is ~lr·sign(g) on every weight,
coherent across a d_model=2048 layer, so AdamW at 3e-4 and at 5e-5 sent the 24-layer
model's loss from 5.5 to 14.7 / 14.3 at step 2; on a 2-layer, d 2048 proxy
(`--layers 2 --seq 256 --accum 1`) AdamW 1e-5 fell 5.85 -> 5.41 -> 5.01 and SGD 0.01
5.85 -> 5.79 -> 5.73, while SGD 1.0 and 0.1 overshot. Without fp32 master copies an update
below half a bf16 ulp is rounded away (half-ulp 3e-5 at |w| ~ 0.01), so the small
weights (c_proj, std 0.02/sqrt(48) ~ 0.003; biases; position table) carry the first steps.
On the full 24-layer model AdamW 1e-5 still went 5.45 -> 11.13; plain SGD (the default),
lr 0.02 with the global gradient norm clipped to 1, fell 5.45 -> 4.59 -> 4.18 (measured,
peak RSS 5.9 GB). SGD keeps no state at all: 2 + 2 = 4 B/param, 4.8 GB; the step is
along the gradient, so a small enough one must lower the loss of the batch. Adam on this
model needs fp32 master weights and a warm-up (or an 8-bit optimizer), which do not fit
beside the other users' memory here.

    .venv/bin/python bench/scale_1b.py [--seq 1024] [--steps 3] [--accum 2]
        [--optim sgd|adamw] [--lr 0.02]
Prints one line per step (loss, seconds, RSS) and a final JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scaletrain.metrics.meters import current_rss_mb, peak_memory_mb  # noqa: E402
from scaletrain.models.gpt import GPT, GPTConfig  # noqa: E402
from scaletrain.models.registry import materialize, spec_for  # noqa: E402
from scaletrain.parallel.ac import apply_ac  # noqa: E402


def corpus_bytes(min_len: int) -> torch.Tensor:
    """The repository's own text files as a byte stream (at least `min_len` bytes)."""
    parts = []
    for pattern in ("*.md", "scaletrain/**/*.py", "docs/**/*.md"):
        for p in sorted(ROOT.glob(pattern)):
            parts.append(p.read_bytes())
    data = b"\n".join(parts)
    while len(data) < min_len:
        data = data * 2
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--optim", choices=("sgd", "adamw"), default="sgd")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--out", default=None, help="write the JSON summary here too")
    args = ap.parse_args()

    t0 = time.perf_counter()
    c = GPTConfig(vocab_size=256, seq_len=args.seq, n_layer=args.layers, n_head=args.heads,
                  d_model=args.d_model, bias=True)
    with torch.device("meta"):
        model = GPT(c)
    model.to(dtype=torch.bfloat16)  # on meta: dtypes only, no memory
    apply_ac(model, "full")
    materialize(model, "cpu", seed=0, tied=spec_for("gpt").tied)  # allocates bf16 directly; init drawn per tensor
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e9:.3f} B parameters, built in {time.perf_counter() - t0:.1f} s, "
          f"RSS {current_rss_mb():.0f} MB", flush=True)
    if args.optim == "sgd":  # no state: bf16 params + grads only
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, foreach=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                weight_decay=0.1, foreach=False)  # foreach: +2.4 GB copies

    data = corpus_bytes((args.steps * args.accum + 1) * (args.seq + 1))
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - args.seq - 1, (args.accum,), generator=gen).tolist()
    losses, step_s = [], []
    for step in range(args.steps):
        t = time.perf_counter()
        total = 0.0
        for i in starts:
            x, y = data[i:i + args.seq][None], data[i + 1:i + args.seq + 1][None]
            logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, 256), y.view(-1)) / args.accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t)
        losses.append(total)
        print(f"step {step + 1}/{args.steps} loss {total:.4f} {step_s[-1]:.1f} s "
              f"RSS {current_rss_mb():.0f} MB peak {peak_memory_mb('cpu'):.0f} MB", flush=True)

    summary = {
        "n_params": n_params, "layers": args.layers, "d_model": args.d_model,
        "seq_len": args.seq, "micro_batch": 1, "accum": args.accum, "steps": args.steps,
        "precision": "bf16-pure (bf16 params and grads; AdamW states, if any, bf16)",
        "optimizer": args.optim, "lr": args.lr,
        "activation_checkpoint": "full", "losses": losses, "step_s": step_s,
        "peak_rss_mb": peak_memory_mb("cpu"), "threads": torch.get_num_threads(),
        "finite": all(math.isfinite(v) for v in losses),
        "falling": losses[-1] < losses[0],
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
