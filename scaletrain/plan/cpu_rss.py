"""Peak resident set size of a CPU training process, from the tensors of each phase
(plan/memory.py) and how glibc's malloc serves them.

glibc serves a request above its mmap threshold with its own mmap and unmaps it on free,
so the RSS follows those tensors exactly. Smaller requests come from the heap arenas:
freed pages stay resident and are reused by later small requests. The threshold is
dynamic: it starts at 128 KiB and rises to the size of each freed mmapped chunk, up to
DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB on 64-bit (mallopt(3)); after the first step every
tensor below 32 MiB is a heap tensor. With `train.malloc_mmap_threshold_mib` set
(plan/malloc.py) every tensor below that size is a heap tensor. Hence (all bytes):

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

from scaletrain.plan.activations import block_activations
from scaletrain.plan.experts import exchange_buffers, moe_blocks, skipped_casts
from scaletrain.plan.malloc import GLIBC_DEFAULT_MAX

MMAP_THRESHOLD = GLIBC_DEFAULT_MAX  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_threshold = [MMAP_THRESHOLD]  # the run's (train.malloc_mmap_threshold_mib): threshold()


@contextlib.contextmanager
def threshold(nbytes: int):
    """Model a process whose mmap threshold is `nbytes` (plan/malloc.py tunes it)."""
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


def activations(cfg, s, r: int, ab: int, modes: list[str],
                fused_head: bool = False) -> tuple[float, float]:
    """The activations of plan/memory.py `activation_bytes`, tensor by tensor (each
    saved tensor measured on the family's block, plan/activations.py, one measurement
    per kind of block: an MoE llama's dense and MoE blocks differ); `modes`: each
    block's AC mode (every k-th, budget: parallel/ac.py), memory.py `rank_block_modes`;
    `fused_head`: the head takes model.loss_chunks' fused path, whose tensors (the
    weight's cast among them) memory.py `fused_head` counts."""
    if not s.layers:
        return (0.0, 0.0)
    D, t, toks = cfg.model.d_model, s.tp, s.tokens * s.in_flight
    layers = tuple(s.blocks) or (0,) * s.layers  # memory.py rank_blocks

    def block(mode: str, layer: int) -> tuple[float, float]:  # one block's saved tensors
        measured = block_activations(cfg.model, cfg.precision.dtype, mode, "cpu", layer)
        return add((0.0, 0.0), *(hm(toks * b) for b in measured.tensor_bytes(t)))

    kept = add((0.0, 0.0), *(block(m, i) for i, m in zip(layers, modes)))
    recomputed = [block("none", i) for i, m in zip(layers, modes) if m != "none"]
    recompute = max(recomputed, key=sum, default=(0.0, 0.0))
    # + ln_f in/out (chunked: the input only, memory.py head_input_bytes)
    ln_out = (0 if cfg.model.loss_chunks > 0 else ab) * toks * D
    out = add(kept, recompute, hm(toks * r * D), hm(ln_out))
    # autocast weight casts, cached to the end of the forward (memory.py)
    for i in layers:
        fixed = block_activations(cfg.model, cfg.precision.dtype, "none", "cpu",
                                  i).fixed_bytes(t)
        out = add(out, *(hm(b) for b in fixed))
    if r != ab and s.has_head and not fused_head:  # autocast's cached head weight cast
        out = add(out, hm(D * s.vocab_local * ab))
    return add(out, expert_parallel(cfg, s, r, ab, layers))


def expert_parallel(cfg, s, r: int, ab: int, layers) -> tuple[float, float]:
    """memory.py `expert_parallel_bytes` tensor by tensor: one MoE layer's all-to-all
    buffers, minus the expert-weight casts (all D·F·ab bytes each) the rank skips."""
    moe = moe_blocks(cfg.model, layers)
    if s.ep <= 1 or not moe:
        return (0.0, 0.0)
    exchange = exchange_buffers(s.expert_dims, s.ep, s.tokens, cfg.model.moe_top_k, r)
    count, numel = skipped_casts(s.expert_dims, s.ep) if ab != r else (0.0, 0.0)
    # (whole on every tp rank: the routed experts are replicated over tp)
    return add(*(hm(b) for b in exchange), scale(hm(numel * ab, count), -len(moe)))


def head(s, tokens: int, per_logit: tuple[int, ...]) -> tuple[float, float]:
    """The head's (tokens, V) tensors of `per_logit` bytes each (models/losses.py
    `cross_entropy_peak_tensors`)."""
    if not s.has_head:
        return (0.0, 0.0)
    return add((0.0, 0.0), *(hm(tokens * s.vocab_local * b) for b in per_logit))


def peak_above_static(phases: dict[str, tuple[float, float]]) -> tuple[float, str, str]:
    """(max heap + max mmap, the heap's phase, the mmap's phase)."""
    h = max(phases, key=lambda k: phases[k][0])
    mm = max(phases, key=lambda k: phases[k][1])
    return phases[h][0] + phases[mm][1], h, mm
