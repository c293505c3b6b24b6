"""Generation speed on the CPU: KV cache vs no cache, and a compressed artefact vs the
original, measured side by side (DESIGN.md §4).

Each pair times A then B (order alternating between pairs) generating `--tokens` greedy
tokens from the same prompt; we report the median of per-pair tokens/s ratios B/A and,
as a noise control, the median ratio of two interleaved runs of A (A/A').

    .venv/bin/python bench/generation.py RUN_DIR [ARTEFACT_DIR ...] [--tokens 100] [--pairs 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scaletrain.compress.artefact import load_artefact  # noqa: E402
from scaletrain.generate import sample  # noqa: E402
from scaletrain.models.registry import spec_of  # noqa: E402

DECODE = None  # the run's family's KV-cache forward (ModelSpec.decode), set in main


def rate(model, prompt, tokens, seq_len, use_cache=True) -> float:
    t0 = time.perf_counter()
    out = sample(model, prompt, max_new_tokens=tokens, seq_len=seq_len, temperature=0,
                 use_cache=use_cache, decode=DECODE)
    return len(out) / (time.perf_counter() - t0)


def pairs(fa, fb, n: int) -> tuple[float, float, float]:
    """(median tokens/s of A, of B, median per-pair ratio B/A), order alternating."""
    ra, rb, ratios = [], [], []
    for i in range(n):
        if i % 2:
            b, a = fb(), fa()
        else:
            a, b = fa(), fb()
        ra.append(a)
        rb.append(b)
        ratios.append(b / a)
    return statistics.median(ra), statistics.median(rb), statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("artefacts", nargs="*")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global DECODE
    cfg, base, tok = load_artefact(args.run_dir)
    DECODE = spec_of(cfg.model).decode
    prompt = tok.encode(cfg.generate.prompt)
    L = cfg.model.seq_len
    n = min(args.tokens, L - len(prompt))  # inside the window: the cache is used throughout
    print(f"threads={torch.get_num_threads()} tokens={n} pairs={args.pairs} seq_len={L}")
    for fn in (lambda: rate(base, prompt, 4, L),):
        fn()  # warm-up
    a, b, r = pairs(lambda: rate(base, prompt, n, L), lambda: rate(base, prompt, n, L),
                    args.pairs)
    print(f"A/A' control                 {a:8.1f} vs {b:8.1f} tok/s  ratio {r:.3f}")
    a, b, r = pairs(lambda: rate(base, prompt, n, L, use_cache=False),
                    lambda: rate(base, prompt, n, L), args.pairs)
    print(f"KV cache vs no cache         {a:8.1f} -> {b:8.1f} tok/s  ratio {r:.3f}")
    for path in args.artefacts:
        _, model, _ = load_artefact(path)
        rate(model, prompt, 4, L)
        a, b, r = pairs(lambda: rate(base, prompt, n, L), lambda: rate(model, prompt, n, L),
                        args.pairs)
        print(f"{Path(path).name:<28} {a:8.1f} -> {b:8.1f} tok/s  ratio {r:.3f}")


if __name__ == "__main__":
    main()
