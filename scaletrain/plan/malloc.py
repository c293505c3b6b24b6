"""glibc's malloc tuned for training on a CPU: large tensors reuse heap pages.

By default glibc serves every request above its mmap threshold (dynamic, at most 32 MiB
on 64-bit) with a fresh `mmap` and returns it with `munmap` on free. A training step
frees and re-allocates the same large tensors every step (logits and their gradient,
the MLP activations at a large micro-batch), so each step page-faults and zero-fills
them again. On the gpt-10m bf16 step (micro 8 x 256, 2 threads) that costs ~11%:
381 ms with glibc's defaults, 338 ms with a 256 MiB threshold (the same script,
`MALLOC_MMAP_THRESHOLD_` set or not). Intel's PyTorch CPU guide recommends jemalloc or
tcmalloc for the same reason; `mallopt` gets it without another library.

`train.malloc_mmap_threshold_mib = M` (0, the default, keeps glibc's behaviour) sets
M_MMAP_THRESHOLD, which also stops the dynamic adjustment, and M_TRIM_THRESHOLD to 4x
that, so that freeing the top of the heap does not hand the pages back either. The cost
is RSS: freed pages stay resident for reuse, which `scaletrain plan` models
(plan/cpu_rss.py: tensors below the threshold are heap tensors). 256 MiB may become the
default (issue 19's rule) only where the plan still predicts the peak within 15% on every
row of bench/plan_accuracy.py, the 1B one included, and it does not yet: with it the
2-process fp32 gpt2-small rows fall further below their measured peaks — mp-tp2 rank 1
-22.1% (-10.0% at 0), mp-ddp -19.2% / -19.2% (-16.1% / -15.2% at 0: short already) —
while the RSS of a DDP rank climbs in steps through the run (freed heap pages not reused
across the step's phases; not yet modelled). Measured on this machine (AMD EPYC, 2 cores)
by `bench/plan_accuracy.py --only mp-ddp,mp-tp2 --extra=--train.malloc_mmap_threshold_mib=N`,
2026-12-04. The other rows hold with it: 1b 18,209 predicted / 17,430 MiB measured
(+4.5%, with model.loss_chunks=-1), 125m-bf16 +1.4%, 125m-fp32-fused -10.8%,
125m-pure-sgd -14.4% (2026-12-03; with `=0`: -1.1%, -11.5%, -11.1%). Only on Linux with glibc, and only on CPU devices (a GPU
run's large tensors are in device memory); the parameter server's processes tune it too.
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
