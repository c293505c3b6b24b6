"""The "shape-matched" GEMM peak: matmul throughput at the shapes the model really runs.

The device peak (metrics.measure_peak_flops) is a square n×n matmul, the best case for
the hardware. A model's linear layers are (M tokens × K) @ (K × N) with K, N the layer's
widths: a 10M GPT with d_model 384 has K = 384 inner dimensions, where a matmul kernel
spends proportionally more time packing and reducing than multiplying. Timing every GEMM
of a training step at its own shape gives the throughput the model's GEMMs *could* reach
— the part of the MFU gap that no training-loop change can close. It is a second
reference line only: MFU stays defined against the true measured peak.

Per `nn.Linear(K, N)` applied to M = micro-batch × seq_len tokens, a training step runs
three GEMMs of 2·M·K·N FLOPs each (PyTorch autograd, `AddmmBackward0`):
    forward       (M, K) @ (K, N)
    grad input    (M, N) @ (N, K)
    grad weight   (N, M) @ (M, K)     (the inner dimension is the token count)
Attention's score/value products (inside the fused SDPA kernel) are not plain GEMMs and
are left out: 12·L·d·T of the 6N + 12·L·d·T FLOPs per token, 7.9% for gpt-10m (seq 256),
3.7% for gpt2-small at seq 256, 13% at its full 1024.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.nn as nn


def linear_gemm_shapes(model: nn.Module, tokens: int) -> Counter:
    """Counter {(m, k, n): count} of the training GEMMs of `model`'s linear layers on a
    forward of `tokens` tokens (a tied head is one Linear; embeddings are lookups)."""
    shapes: Counter = Counter()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            k, n = m.in_features, m.out_features
            shapes[(tokens, k, n)] += 1   # forward
            shapes[(tokens, n, k)] += 1   # grad input
            shapes[(n, tokens, k)] += 1   # grad weight
    return shapes


def _best_mm_s(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
               repeats: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=g, device=device).to(dtype)
    b = torch.randn(k, n, generator=g, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # first calls choose the kernel and warm the caches
        torch.mm(a, b, out=out)
    sync()
    inner = 10 if device.type == "cuda" else 1  # a GPU matmul is near a sync's cost
    best = float("inf")
    for _ in range(repeats):  # best, not mean: on shared cores noise only adds time
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def shape_matched_peak(shapes: Counter, dtype: torch.dtype, threads: int,
                       device: torch.device | str = "cpu", repeats: int = 5) -> dict:
    """FLOP/s of `shapes` run back to back in `dtype`: Σ FLOPs / Σ best times.

    Returns {"flops": the aggregate FLOP/s, "per_shape": [[m, k, n, count, FLOP/s]]}.
    """
    device = torch.device(device)
    old = torch.get_num_threads()
    total_flops = total_s = 0.0
    rows = []
    try:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        for (m, k, n), count in sorted(shapes.items()):
            s = _best_mm_s(m, k, n, dtype, device, repeats)
            f = 2.0 * m * k * n
            total_flops += f * count
            total_s += s * count
            rows.append([m, k, n, count, f / s])
    finally:
        torch.set_num_threads(old)
    return {"flops": total_flops / total_s if total_s else 0.0, "per_shape": rows}
