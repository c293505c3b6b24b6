"""Where a training step's time goes, per kind of operator, from `torch.profiler`.

`profile_step(fn)` runs `fn` (one optimizer step) under the CPU profiler and sums the
*self* time of every recorded operator into a category:

    gemm         aten::mm / addmm / bmm / linear kernels (inductor's extern GEMMs too)
    attention    scaled_dot_product_attention kernels (flash attention on CPU)
    layernorm    native_layer_norm and its backward
    gelu         gelu and its backward
    softmax/CE   the loss: log_softmax, nll_loss and their backwards
    casts/copies copy_ / _to_copy / fill_ / zero_ (autocast's weight and activation casts)
    elementwise  the remaining ATen ops (adds, muls, sums, views ...)
    compiled     inductor's fused C++ kernels: the self time of a compiled graph call
    optimizer    everything under `Optimizer.step` (whatever its ops)
    framework    wall time not inside any operator: Python, autograd bookkeeping, hooks

Self times of a region add up to its wall time on the main thread (intra-op threads
work inside an operator's span), so the categories sum to the step's wall time; the
profiler's own cost per recorded op inflates `framework` slightly (a few µs per op).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

CATEGORIES = ("gemm", "attention", "layernorm", "gelu", "softmax/CE", "casts/copies",
              "elementwise", "compiled", "optimizer", "framework")

_GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
         "aten::linear", "aten::_addmm_activation")
_CASTS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::fill_", "aten::zero_",
          "aten::clone", "aten::contiguous")


def categorize(name: str, in_optimizer: bool) -> str:
    """The category of one profiler event by its name (see the module docstring)."""
    if in_optimizer:
        return "optimizer"
    n = name.lower()
    if "compiledfxgraph" in n or "torch-compiled region" in n or n.startswith("cpp_fused"):
        return "compiled"
    if name in _GEMM or "mkldnn" in n or "onednn" in n:  # oneDNN linear / matmul kernels
        return "gemm"
    if "scaled_dot_product" in n or "flash_attention" in n:
        return "attention"
    if "layer_norm" in n:
        return "layernorm"
    if "gelu" in n:
        return "gelu"
    if "softmax" in n or "nll_loss" in n or "cross_entropy" in n:
        return "softmax/CE"
    if name in _CASTS:
        return "casts/copies"
    if name.startswith("aten::"):
        return "elementwise"
    return "framework"  # record_function regions, autograd nodes: their self time


def _in_optimizer(ev) -> bool:
    while ev is not None:
        if ev.name.startswith("Optimizer.step") or ev.name.startswith("Optimizer.zero_grad"):
            return True
        ev = ev.cpu_parent
    return False


def breakdown(events, wall_s: float) -> dict[str, float]:
    """Seconds per category for profiler `events` that took `wall_s` seconds of wall time."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    covered = 0.0
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        if ev.cpu_parent is None:  # top-level spans: what the profiler saw at all
            covered += (ev.time_range.end - ev.time_range.start) / 1e6
        out[categorize(ev.name, _in_optimizer(ev))] += ev.self_cpu_time_total / 1e6
    out["framework"] += max(0.0, wall_s - covered)  # between operators: Python, glue
    return out


def profile_step(fn: Callable[[], object], steps: int = 1) -> dict:
    """Profile `steps` calls of `fn`; {"wall_s": per step, "aten_ops": ATen calls per
    step (nested ones included), "ops_s": {category: s/step},
    "top": the 15 operators with the most self time}."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = time.perf_counter() - t
    events = prof.events()
    ops = breakdown(events, wall)
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    n_aten = sum(1 for e in events if e.name.startswith("aten::"))
    return {"wall_s": wall / steps, "aten_ops": n_aten / steps,
            "ops_s": {k: v / steps for k, v in ops.items()},
            "top": [(e.key, e.self_cpu_time_total / 1e6 / steps, e.count // steps)
                    for e in top]}
