"""Peak resident set size of a CPU training process, from the tensors of each phase
(plan/memory.py) and how glibc's malloc serves them.

glibc serves a request above its mmap threshold with its own mmap and unmaps it on free,
so the RSS follows those tensors exactly. Smaller requests come from the heap arenas:
freed pages stay resident and are reused by later small requests. The threshold is
dynamic: it starts at 128 KiB and rises to the size of each freed mmapped chunk, up to
DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB on 64-bit (mallopt(3)); after the first step every
tensor below 32 MiB is a heap tensor. With `train.malloc_mmap_threshold_mib` set
(train/malloc.py) every tensor below that size is a heap tensor. Hence (all bytes):

    peak RSS = baseline + static + max over phases (heap bytes live in the phase)
                                 + max over phases (mmapped bytes live in the phase)

The two maxima can come from different phases: the heap's high-water mark stays
resident while the large tensors come and go. Phases (plan/memory.py doc): the
forward/backward (gradients — they exist at the end of every backward — + activations
+ autocast weight casts + head), the optimizer step (gradients, fp32 under masters, +
the optimizer's temporaries), evaluation (logits + CE temporaries) and the end (the
weights serialised to bytes by safetensors, + gathered copies when split). With gradient
accumulation the next micro-batch's heap activations land beside the holes the last one
left among the gradients: CPU_ACCUM_FACTOR on the heap part (memory.py).
"""

from __future__ import annotations

import contextlib

from scaletrain.train.malloc import GLIBC_DEFAULT_MAX

MMAP_THRESHOLD = GLIBC_DEFAULT_MAX  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_threshold = [MMAP_THRESHOLD]  # the run's (train.malloc_mmap_threshold_mib): threshold()


@contextlib.contextmanager
def threshold(nbytes: int):
    """Model a process whose mmap threshold is `nbytes` (train/malloc.py tunes it)."""
    old, _threshold[0] = _threshold[0], nbytes
    try:
        yield
    finally:
        _threshold[0] = old


def hm(size: float, count: float = 1.0) -> tuple[float, float]:
    """(heap, mmap) bytes of `count` tensors of `size` bytes each."""
    return (size * count, 0.0) if size < _threshold[0] else (0.0, size * count)


def add(*vs: tuple[float, float]) -> tuple[float, float]:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs))


def scale(v: tuple[float, float], k: float) -> tuple[float, float]:
    return (v[0] * k, v[1] * k)


def per_param(numels, nbytes: float) -> tuple[float, float]:
    """One tensor of `nbytes` per element for every parameter."""
    return add((0.0, 0.0), *(hm(n * nbytes) for n in numels))


def activations(cfg, s, r: int, ab: int) -> tuple[float, float]:
    """The activations of plan/memory.py `activation_bytes`, tensor by tensor."""
    if not s.layers:
        return (0.0, 0.0)
    m = cfg.model
    D, t, toks = m.d_model, s.tp, s.tokens * s.in_flight
    ff = m.d_ff or 4 * D

    def block() -> tuple[float, float]:  # the no-AC block, per memory.block_bytes
        return add(hm(toks * r * D, 2), hm(toks * ab * D, 2), hm(toks * 3 * ab * D / t),
                   hm(toks * ab * D / t), hm(toks * ff * ab / t, 2),
                   hm(toks * (4 * m.n_head / t + 16)))  # SDPA logsumexp, LN statistics

    # Each block's mode (every k-th, budget: parallel/ac.py), as memory.activation_bytes.
    from scaletrain.plan.memory import rank_block_modes

    modes = rank_block_modes(cfg, s)
    n_full, n_sel = modes.count("full"), modes.count("selective")
    n_none = s.layers - n_full - n_sel
    full = hm(toks * r * D, n_full)
    selective = add(hm(toks * r * D, n_sel), hm(toks * 3 * ab * D / t, n_sel),
                    hm(toks * ab * D / t, 2 * n_sel), hm(toks * ab * D, n_sel),
                    hm(toks * ff * ab / t, n_sel))
    kept = add(full, selective, scale(block(), n_none))
    out = add(kept, block() if n_none < s.layers else (0.0, 0.0),
              hm(toks * r * D), hm(toks * ab * D))  # + one recompute, ln_f in/out
    if r != ab:  # autocast weight casts, cached to the end of the forward (memory.py)
        w = add(hm(3 * D * D * ab / t), hm(D * D * ab / t), hm(D * ff * ab / t, 2))
        out = add(out, scale(w, s.layers),
                  hm(D * s.vocab_local * ab) if s.has_head else (0.0, 0.0))
    return out


def head(s, ab: int, tokens: int, fp32_tensors: int) -> tuple[float, float]:
    """Logits (ab) + `fp32_tensors` fp32 (tokens, V) temporaries."""
    if not s.has_head:
        return (0.0, 0.0)
    return add(hm(tokens * s.vocab_local * ab), hm(tokens * s.vocab_local * 4, fp32_tensors))


def peak_above_static(phases: dict[str, tuple[float, float]]) -> tuple[float, str, str]:
    """(max heap + max mmap, the heap's phase, the mmap's phase)."""
    h = max(phases, key=lambda k: phases[k][0])
    mm = max(phases, key=lambda k: phases[k][1])
    return phases[h][0] + phases[mm][1], h, mm
