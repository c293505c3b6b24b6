"""Step time and state bytes of AdamW8bit vs torch.optim.AdamW (foreach and fused).

The tensors of a ~125M-parameter GPT-2-small (vocab 50304, 12 layers, d_model 768,
seq 1024: 124.5M parameters in 148 tensors) in fp32 with fixed random gradients; each
optimizer owns a copy of the parameters. Each round times one step of every optimizer,
in a rotating order (so drift favours none), plus a second timing of AdamW foreach as
an A/A noise control. adamw8bit runs its update eagerly (foreach batches) and, as
"adamw8bit-compiled" (optim.implementation = "fused"), as one torch.compile'd kernel
per tensor slice; "first two steps" includes creating the state (and compiling).
Reported: the median over rounds of each per-round ratio to AdamW foreach (DESIGN.md
§4), the median seconds, and the exact state bytes.

    flock /tmp/scaletrain-bench.lock .venv/bin/python bench/optim8bit.py \\
        [--rounds 10] [--threads 2] [--layers 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scaletrain.optim.adamw8bit import AdamW8bit, state_bytes  # noqa: E402


def gpt2_shapes(layers: int, d: int = 768, vocab: int = 50304, seq: int = 1024) -> list:
    """Parameter shapes of a GPT-2-style model (tied head), as scaletrain's GPT."""
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d),
             (4 * d,), (d, 4 * d), (d,)]
    return [(vocab, d), (seq, d), *block * layers, (d,), (d,)]


def make(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if name.startswith("adamw8bit"):  # "-compiled": optim.implementation = "fused"
        return AdamW8bit(groups, lr=1e-4, betas=(0.9, 0.95),
                         compile=name.endswith("compiled"))
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95),
                             **({"fused": True} if name == "fused" else {"foreach": True}))


def state_size(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values()
               for v in st.values() if torch.is_tensor(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = gpt2_shapes(a.layers)
    n = sum(torch.Size(s).numel() for s in shapes)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    names = ("foreach", "fused", "adamw8bit", "adamw8bit-compiled")
    opts = {}
    for name in names:
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr  # shared: no optimizer writes to its gradients
        opts[name] = make(name, params)
        t0 = time.perf_counter()
        opts[name].step()  # state created (and kernels compiled) outside the timed steps
        opts[name].step()
        print(f"{name}: first two steps {time.perf_counter() - t0:.1f} s")
    print(f"{n / 1e6:.1f}M parameters in {len(shapes)} tensors, threads={a.threads}, "
          f"rounds={a.rounds}")
    timed = [*names, "foreach (A/A)"]
    secs = {k: [] for k in timed}
    for r in range(a.rounds):
        order = timed[r % len(timed):] + timed[:r % len(timed)]
        for k in order:
            opt = opts[k.split(" ")[0]]
            t0 = time.perf_counter()
            opt.step()
            secs[k].append(time.perf_counter() - t0)
    ratio = {k: statistics.median(s / f for s, f in zip(secs[k], secs["foreach"]))
             for k in timed}
    print(f"{'optimizer':16s} {'median s/step':>14s} {'x foreach':>10s} "
          f"{'state MB':>9s} {'B/param':>8s}")
    for k in timed:
        sb = state_size(opts[k.split(" ")[0]])
        print(f"{k:16s} {statistics.median(secs[k]):14.3f} {ratio[k]:10.2f} "
              f"{sb / 1e6:9.1f} {sb / n:8.3f}")
    predicted = sum(state_bytes(s) for s in shapes)
    assert predicted == state_size(opts["adamw8bit"]), "state_bytes() disagrees"
    print(f"adamw8bit state = state_bytes() = {predicted} B; torch AdamW "
          f"{state_size(opts['foreach'])} B ({state_size(opts['foreach']) / predicted:.2f}x)")


if __name__ == "__main__":
    main()
