"""Throughput, model FLOPs utilisation (MFU) and memory meters (DESIGN.md §4).

MFU = achieved model FLOP/s / peak FLOP/s of the device. The model FLOPs come from a
formula (:func:`gpt_flops_per_token`), not a profiler, so MFU is comparable across
implementations (recomputation in activation checkpointing does not count as useful
work). The peak is measured, not looked up: on CPU there is no datasheet number for
"2 cores of a shared VM", so :func:`measure_peak_flops` times a large matmul in the same
dtype and thread count as training and caches the result.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from scaletrain.metrics.summary import write_json_atomic

MiB = 1 << 20


# ----------------------------------------------------------------------------- FLOPs

def gpt_flops_per_token(n_params: int, n_layer: int, n_head: int, d_head: int,
                        seq_len: int) -> int:
    """Training FLOPs per token of a decoder-only transformer: ``6N + 12·L·H·Q·T``.

    Source: PaLM (Chowdhery et al. 2022), appendix B. ``6N``: each parameter that
    multiplies an activation costs 2 FLOPs (multiply + add) in the forward and 4 in the
    backward (gradients w.r.t. input and weight). ``12·L·H·Q·T``: the attention scores
    ``QKᵀ`` and the weighted sum ``AV``, 2·2·H·Q·T FLOPs per token per layer forward,
    times 3 for forward + backward. The causal mask is ignored (the usual convention,
    as in PaLM and nanoGPT), so kernels that skip masked blocks exceed this count.

    Args:
        n_params: N, the parameters that take part in a matmul per token. The caller
            chooses; our convention (as nanoGPT's ``estimate_mfu``) is *all parameters
            except the position embedding*: a lookup table costs no FLOPs, but with tied
            input/output embeddings the token embedding is the LM head's weight, a
            real ``d_model × vocab`` matmul, so it counts. With untied embeddings,
            exclude the input token embedding too. (PaLM's "non-embedding N" differs
            from this only by the LM head.)
        n_layer: L, transformer blocks.
        n_head: H, attention heads.
        d_head: Q, head dimension (d_model / n_head).
        seq_len: T, tokens per sequence (context length used in training).
    """
    return 6 * n_params + 12 * n_layer * n_head * d_head * seq_len


# ------------------------------------------------------------------------ peak FLOP/s

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu:" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"cpu:{platform.processor() or platform.machine()}"


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/scaletrain/peak_flops.json`` (default ``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "scaletrain" / "peak_flops.json"


def _time_matmul(a: torch.Tensor, b: torch.Tensor, warmup: int, repeats: int,
                 inner: int) -> float:
    """Best wall time (s) of `inner` back-to-back ``a @ b`` over `repeats` trials.

    Best, not mean: on a shared machine noise only ever adds time, so the minimum is
    the closest estimate of what the hardware can do.
    """
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    out = torch.empty_like(a)
    for _ in range(warmup):  # first calls pay for thread-pool start and kernel choice
        torch.mm(a, b, out=out)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def cpu_matmul_size(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 1024, 512),
                    max_seconds: float = 0.25) -> int:
    """The largest of `sizes` whose n×n matmul in `dtype` a probe of the smallest
    estimates at <= `max_seconds` on this CPU (at the current thread count), else the
    smallest: the peak wants a matmul large enough to amortise the kernel's start, but a
    dtype without a fast kernel (fp16 on most CPUs, ~100x slower than fp32) would spend
    minutes of a run's start on a 2048 matmul timed 7 times."""
    m = min(sizes)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, m, generator=g).to(dtype)
    rate = 2.0 * m ** 3 / _time_matmul(a, a, warmup=1, repeats=1, inner=1)
    return max((s for s in sizes if 2.0 * s ** 3 / rate <= max_seconds), default=m)


def measure_peak_flops(dtype: torch.dtype = torch.float32, threads: int | None = None,
                       device: str | torch.device = "cpu", *, n: int | None = None,
                       warmup: int = 2, repeats: int = 5,
                       cache_path: str | os.PathLike | None = None,
                       use_cache: bool = True) -> float:
    """Peak FLOP/s of `device` for `dtype`: ``2·n³`` over the best time of an n×n matmul.

    Args:
        dtype: matmul dtype; use the training compute dtype (bf16 under autocast).
        threads: CPU intra-op threads to measure with (default: current setting);
            restored afterwards. Use the trainer's thread count.
        device: ``"cpu"`` or a CUDA device.
        n: matrix size; default 8192 on CUDA (large enough to saturate the tensor
            cores) and on CPU the largest of 2048 / 1024 / 512 whose matmul a probe
            estimates at <= 0.25 s (:func:`cpu_matmul_size`: 2048 for fp32 and bf16,
            ~0.1 s on 2 cores; fp16 has no fast CPU kernel on most machines and would
            take minutes at 2048).
        cache_path: JSON cache file (default :func:`default_cache_path`). Entries are
            keyed by device / CPU model, dtype, threads, torch version and n, so a
            new torch or machine re-measures.
        use_cache: False always measures; the entry keeps the larger of the old and
            new figures.

    Measure before training starts, and on one process per machine: ranks timing
    matmuls at once on shared cores would each see a fraction of the peak.
    """
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    if n is None and device.type == "cuda":
        n = 8192
    # A CPU default is keyed "n=auto": the size is chosen by a probe on a cache miss.
    key = "|".join([_device_name(device), str(dtype), f"threads={threads}",
                    f"torch={torch.__version__}", f"n={n or 'auto'}"])
    path = Path(cache_path) if cache_path is not None else default_cache_path()

    cache: dict = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            cache = {}  # a corrupt cache is just re-measured and rewritten
    if use_cache and isinstance(cache.get(key), dict) and "flops" in cache[key]:
        return float(cache[key]["flops"])

    old_threads = torch.get_num_threads()
    try:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        n = n or cpu_matmul_size(dtype)
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=device).to(dtype)
        b = torch.randn(n, n, generator=g, device=device).to(dtype)
        inner = 10 if device.type == "cuda" else 1  # amortise the sync on fast GPUs
        seconds = _time_matmul(a, b, warmup, repeats, inner)
    finally:
        torch.set_num_threads(old_threads)

    flops = 2.0 * n ** 3 / seconds
    # A peak is a maximum: other work on shared cores can only slow the matmul, so a
    # re-measurement never lowers the cached figure (MFU errs low, never high).
    old = cache.get(key)
    if isinstance(old, dict) and isinstance(old.get("flops"), (int, float)):
        flops = max(flops, float(old["flops"]))
    cache[key] = {"flops": flops, "gflops": round(flops / 1e9, 1), "n": n,
                  "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        # Atomic: concurrent writers (several runs) leave a valid file, last one wins.
        write_json_atomic(path, cache)
    except OSError:
        pass  # a read-only home must not stop training
    return flops


# ------------------------------------------------------------------------ throughput

class Throughput:
    """Tokens/s over the window between two log points, and the MFU it implies.

    Usage: ``start()`` once (after any warmup step you want excluded), ``step(tokens)``
    every optimizer step, ``lap()`` at each log point, which closes the window and
    returns its tokens/s. On CUDA, call ``lap()`` after something that synchronises
    (e.g. ``loss.item()``), or the window measures kernel launches, not work.

    Args:
        clock: a monotonic seconds clock; injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._t0: float | None = None
        self._window_t0 = 0.0
        self._window_tokens = 0
        self.total_tokens = 0
        self.tokens_per_s = 0.0
        """Tokens/s of the last closed window (0.0 before the first `lap`)."""

    def start(self) -> None:
        """Start timing now; clears all counts."""
        self._t0 = self._window_t0 = self._clock()
        self._window_tokens = self.total_tokens = 0
        self.tokens_per_s = 0.0

    def step(self, tokens: int) -> None:
        """Count `tokens` processed since the previous call."""
        if self._t0 is None:
            raise RuntimeError("Throughput.step() called before start()")
        self._window_tokens += tokens
        self.total_tokens += tokens

    def lap(self) -> float:
        """Close the current window; return (and keep in ``tokens_per_s``) its tokens/s."""
        if self._t0 is None:
            raise RuntimeError("Throughput.lap() called before start()")
        now = self._clock()
        dt = now - self._window_t0
        self.tokens_per_s = self._window_tokens / dt if dt > 0 else 0.0
        self._window_t0, self._window_tokens = now, 0
        return self.tokens_per_s

    @property
    def elapsed_s(self) -> float:
        """Seconds since `start`."""
        return 0.0 if self._t0 is None else self._clock() - self._t0

    @property
    def avg_tokens_per_s(self) -> float:
        """Tokens/s since `start` (for summary.json)."""
        dt = self.elapsed_s
        return self.total_tokens / dt if dt > 0 else 0.0

    def mfu(self, flops_per_token: float, peak_flops: float,
            tokens_per_s: float | None = None) -> float:
        """Model FLOPs utilisation of the last window (or of `tokens_per_s`).

        Tokens and peak must describe the same hardware: per-rank tokens with one
        device's peak, or global tokens with world_size × peak.
        """
        rate = self.tokens_per_s if tokens_per_s is None else tokens_per_s
        return rate * flops_per_token / peak_flops


# ---------------------------------------------------------------------------- memory

def peak_memory_mb(device: str | torch.device | None = None) -> float:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` on a CUDA device, else the
    process's peak resident set size (``getrusage`` ``ru_maxrss``).

    The CPU number covers the whole process (interpreter, libraries, data), not only
    tensors, and cannot be reset: it is the high-water mark since the process began.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux but bytes on macOS (getrusage(2) on each).
    return rss / MiB if sys.platform == "darwin" else rss / 1024


def current_rss_mb() -> float:
    """Current resident set size of this process in MiB (``/proc/self/statm``; falls
    back to the peak from ``getrusage`` where /proc does not exist)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / MiB
    except (OSError, ValueError, IndexError):
        return peak_memory_mb("cpu")
