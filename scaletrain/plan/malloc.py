"""glibc's malloc tuned for training on a CPU: large tensors reuse heap pages.

By default glibc serves every request above its mmap threshold (dynamic, at most 32 MiB
on 64-bit) with a fresh `mmap` and returns it with `munmap` on free. A training step
frees and re-allocates the same large tensors every step (logits and their gradient,
the MLP activations at a large micro-batch), so each step page-faults and zero-fills
them again. On the gpt-10m bf16 step (micro 8 x 256, 2 threads) that costs ~11%:
381 ms with glibc's defaults, 338 ms with a 256 MiB threshold (the same script,
`MALLOC_MMAP_THRESHOLD_` set or not). Intel's PyTorch CPU guide recommends jemalloc or
tcmalloc for the same reason; `mallopt` gets it without another library.

`train.malloc_mmap_threshold_mib = M` (256, the default; 0 keeps glibc's behaviour)
sets M_MMAP_THRESHOLD, which also stops the dynamic adjustment, and M_TRIM_THRESHOLD to
4x that, so that freeing the top of the heap does not hand the pages back either. The
cost is RSS: freed pages stay resident for reuse, which `scaletrain plan` models
(plan/cpu_rss.py: tensors below the threshold are heap tensors; the backward's V·D
gradient temporaries take fresh heap pages, plan/memory.py). 256 MiB became the default
(issue 19's rule) once the plan predicted the peak within 15% on every row of
bench/plan_accuracy.py at it, the 1B one included: measured 2026-12-04 on this machine
(AMD EPYC, 2 cores) by `bench/plan_accuracy.py --with-1b
--extra=--train.malloc_mmap_threshold_mib=256`, worst rows mp-pp2 rank 1 -13.0%,
moe-tiny-ep2 -12.2%, 125m-bf16 +9.0%, 1b +5.8% (18,272 predicted / 17,267 MiB). Before
the plan counted the backward's tied-embedding gradient temporaries, mp-tp2 rank 1 was
-22.1% and mp-ddp -19.2% there (-16.1% already at glibc's defaults). The pages it keeps
cost most where activations are large: configs/gpt-1b.toml (seq 1024) keeps glibc's
allocator, since plan puts it at 24.9 GB with 256 against 21.8 GB without, on a 24 GiB
machine. Only on Linux with glibc, and only on CPU devices (a GPU run's large tensors
are in device memory); the parameter server's processes tune it too.
"""

from __future__ import annotations

from scaletrain.data.heap import glibc_function

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
GLIBC_DEFAULT_MAX = 32 * 2 ** 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def mmap_threshold_bytes(mib: int) -> int:
    """The threshold the plan should assume: glibc's own unless tuned."""
    return mib * 2 ** 20 if mib > 0 else GLIBC_DEFAULT_MAX


def tune_malloc(mib: int) -> bool:
    """Apply `train.malloc_mmap_threshold_mib`; True if glibc took it."""
    mallopt = glibc_function("mallopt") if mib > 0 else None
    if mallopt is None:
        return False
    size = mib * 2 ** 20
    return bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, 4 * size))
