"""The cost of drawing batches from a data.mixture against a single dataset.

A: `StatefulLoader` over one `TokenWindows`; B: over a `MixtureWindows` of three sources
holding the same tokens in total (weights 0.5 / 0.3 / 0.2), so B adds the blending loop
(data/mixture.py) and one memory-map read per source. Segments of `--batches` batches
alternate A / B / A' for `--pairs` pairs; reported: ms per global batch, the median of
the per-pair ratios B/A and the A'/A control (DESIGN.md §4). Token files are random ids
in a temporary directory (the read pattern, not the content, is what costs).

    .venv/bin/python bench/mixture_sampler.py [--batch 512] [--seq-len 128] [--pairs 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.data.datasets import MixtureWindows, TokenWindows  # noqa: E402
from scaletrain.data.loader import StatefulLoader  # noqa: E402


def timed(loader: StatefulLoader, batches: int) -> float:
    t = time.perf_counter()
    for _ in range(batches):
        loader.next()
    return (time.perf_counter() - t) / batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512, help="global batch, samples")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=20_000_000, help="tokens in all")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--batches", type=int, default=20, help="batches per timed segment")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        whole = Path(d) / "all.bin"
        ids = rng.integers(0, 4096, args.tokens).astype("<u2")
        ids.tofile(whole)
        shares = np.cumsum([0, 0.5, 0.3, 0.2]) * args.tokens
        parts = []
        for i in range(3):
            p = Path(d) / f"s{i}.bin"
            ids[int(shares[i]):int(shares[i + 1])].tofile(p)
            parts.append(TokenWindows(p, "uint16", args.seq_len))
        single = TokenWindows(whole, "uint16", args.seq_len)
        mix = MixtureWindows(parts, ["a", "b", "c"], [0.5, 0.3, 0.2])
        a = StatefulLoader(single, args.batch, seed=1)
        a2 = StatefulLoader(single, args.batch, seed=2)
        b = StatefulLoader(mix, args.batch, seed=1)
        for ld in (a, a2, b):  # warm-up: first touch of the memory maps
            timed(ld, 3)
        ratios, controls, ta, tb = [], [], [], []
        for i in range(args.pairs):
            order = [(a, "a"), (b, "b"), (a2, "a2")] if i % 2 == 0 else \
                [(b, "b"), (a2, "a2"), (a, "a")]
            t = {name: timed(ld, args.batches) for ld, name in order}
            ratios.append(t["b"] / t["a"])
            controls.append(t["a2"] / t["a"])
            ta.append(t["a"])
            tb.append(t["b"])
    print(f"global batch {args.batch} x seq {args.seq_len}, {args.pairs} pairs of "
          f"{args.batches} batches")
    print(f"single dataset  {1e3 * statistics.median(ta):8.3f} ms/batch")
    print(f"mixture of 3    {1e3 * statistics.median(tb):8.3f} ms/batch")
    print(f"ratio mixture/single {statistics.median(ratios):.3f}  "
          f"(A/A control {statistics.median(controls):.3f})")


if __name__ == "__main__":
    main()
