"""Where a training step's time goes on a GPU: its kernels' device time, by kind.

bench/ops.py splits a CPU step by the self time of its ATen operators. On a GPU those
times are only the launches; the work is the kernels, named by the library that wrote
them (cuBLAS / CUTLASS GEMMs, flash attention, inductor's Triton kernels). This module
profiles CPU + CUDA, sums each kernel's device time into a category by its name, and
calls the rest of the step's wall time `idle`: the GPU waiting for the host (launch
gaps, Python, syncs), assuming one stream, which is what a one-process step uses.

    gemm          cuBLAS / cuBLASLt / CUTLASS matmuls (and torch._grouped_mm's)
    attention     flash / memory-efficient / cuDNN attention kernels
    softmax/CE    the loss kernels when eager (compiled ones are Triton kernels)
    compiled      inductor's Triton kernels (fused element-wise, norms, the loss)
    casts/copies  copies, fills, memset / memcpy
    optimizer     the optimizer's multi-tensor (foreach / fused) kernels
    elementwise   every other kernel
    idle          the step's wall time with no kernel running
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from scaletrain.bench.ops import profile_step

GPU_CATEGORIES = ("gemm", "attention", "softmax/CE", "compiled", "casts/copies",
                  "optimizer", "elementwise", "idle")

_GEMM = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "grouped_mm")
_ATTENTION = ("flash", "fmha", "attention", "sdpa")
_CASTS = ("copy", "memcpy", "memset", "fill")  # a bf16 cast is a copy kernel


def categorize_kernel(name: str) -> str:
    """The category of one CUDA kernel by its name (see the module docstring)."""
    n = name.lower()
    if n.startswith("triton"):
        return "compiled"
    if "multi_tensor" in n or "adam" in n:
        return "optimizer"
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _GEMM):
        return "gemm"
    if "softmax" in n or "nll_loss" in n or "cross_entropy" in n:
        return "softmax/CE"
    if any(k in n for k in _CASTS):
        return "casts/copies"
    return "elementwise"


def profile_gpu_step(fn: Callable[[], object], device: torch.device,
                     steps: int = 1) -> dict:
    """Profile `steps` calls of `fn` on CUDA `device`: {"wall_s", "ops_s": {category:
    s/step}, "top": the 15 kernels with the most device time, "kernels": launches per
    step, "kernel_s": their device time per step} — the keys of bench/ops.py
    profile_step, so report tables print either. The profiler's own host cost per
    launch lengthens a launch-bound step, so `idle` overstates the unprofiled step's
    gaps; its step time less `kernel_s` is the honest figure (bench/report.py)."""
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
    ops = dict.fromkeys(GPU_CATEGORIES, 0.0)
    per_kernel: dict[str, list] = {}
    n_kernels = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        seconds = ev.time_range.elapsed_us() / 1e6
        ops[categorize_kernel(ev.name)] += seconds
        entry = per_kernel.setdefault(ev.name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
        n_kernels += 1
    kernel_s = sum(ops.values())
    ops["idle"] = max(0.0, wall - kernel_s)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {"wall_s": wall / steps, "kernels": n_kernels / steps,
            "kernel_s": kernel_s / steps,
            "ops_s": {k: v / steps for k, v in ops.items()},
            "top": [(name, s / steps, n // steps) for name, (s, n) in top]}


def profile_step_on(fn: Callable[[], object], device: torch.device) -> dict:
    """One step of `fn` profiled the way its device needs: kernels on CUDA, ATen
    operators' self time on the CPU (bench/ops.py)."""
    return profile_gpu_step(fn, device) if device.type == "cuda" else profile_step(fn)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
