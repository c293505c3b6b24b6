"""`model.loss_chunks = -1` (auto, the default): whether a run's head + loss is chunked
(models/chunked_loss.py), decided once per run from its shape — the trainer
(train/trainer.py) and `plan` (plan/report.py) both resolve it here, so they agree.

The rule: chunk, into AUTO_CHUNKS pieces, when one micro-batch's fp32 logits (tokens x
vocabulary x 4 B, what the unchunked cross-entropy makes several of) reach
AUTO_MIN_LOGIT_BYTES and the fused head's own tensors (models/chunked_loss.py
`fused_buffer_bytes`: its (V, D) weight gradient, made in the forward, with a bf16
product and an fp32 copy under autocast) are at most AUTO_MAX_FUSED_SHARE of the
unchunked logits and cross-entropy temporaries. With few tokens per micro-batch and a
wide model the (V, D) buffers rival the (N, V) logits (GPT-2 small at 2 x 128 tokens:
256 tokens < D 768; under bf16 chunking would raise its peak, 2877 -> 3076 MiB
predicted), and the fused path updates them once per piece. Only where the fused path
runs and was measured: no tensor
parallelism (its checkpointed path recomputes the head: one more matmul per token), no
torch.compile (the compiled head + loss region is not tested chunked), the plain
next-token loss (distillation needs the whole logits, DPO takes its log-probs from the
logits). Below the threshold, or outside those, it resolves to 0: the whole logits.
"""

from __future__ import annotations

from dataclasses import replace

from scaletrain.config.schema import Config
from scaletrain.models.chunked_loss import fused_head_tensors, unchunked_head_bytes

# model.loss_chunks=-1: decided here; the default. Its speed condition, gpt-10m's
# tokens/s >= 0.97x unchunked (bench/chunked_loss.py --chunks 8 --rounds 10 --steps 3),
# measured 1.117x (A/A 1.011) on a quiet machine in session 10.
AUTO = -1
# Why 32 MiB: it is glibc's largest dynamic mmap threshold (plan/malloc.py
# GLIBC_DEFAULT_MAX). Logits at or above it are mmapped afresh for every micro-batch
# and page-faulted in (as are their fp32 cross-entropy temporaries), which is what the
# fused head avoids: gpt-10m's 8 x 256 x 8192 logits (64 MiB) train 1.11x faster chunked
# (bench/chunked_loss.py, A/A 1.05). Below it they come from reused heap pages, and the
# head alone is slower chunked (--head-only: 0.80x), so nothing is gained there.
AUTO_MIN_LOGIT_BYTES = 32 << 20
AUTO_CHUNKS = 8  # the measured setting (bench/chunked_loss.py --chunks 8)
# Why a half: the measured speed-up is at gpt-10m's shape, where the fused head holds a
# quarter of the unchunked head's bytes (56 of 224 MiB, bf16); where the two are
# comparable, the per-piece (V, D) gradient updates are most of the head's work and
# their cost was not measured, and the memory saved is small anyway.
AUTO_MAX_FUSED_SHARE = 0.5


def resolve_loss_chunks(cfg: Config, kind: str, vocab: int, micro: int, tp: int) -> int:
    """model.loss_chunks for this run: the configured value when >= 0, else the rule of
    the module doc for `micro` samples of model.seq_len tokens per micro-batch over a
    `vocab`-word head; `kind`: the model family's ("text" / "image")."""
    n = cfg.model.loss_chunks
    if n != AUTO:
        return n
    if (kind != "text" or tp > 1 or cfg.train.compile or cfg.distill.teacher
            or cfg.train.objective != "lm"):
        return 0
    T, N = cfg.model.seq_len, micro * cfg.model.seq_len
    n = min(AUTO_CHUNKS, T)
    if N * vocab * 4 < AUTO_MIN_LOGIT_BYTES:
        return 0
    kept, work = fused_head_tensors(cfg.precision.dtype, N, vocab, cfg.model.d_model, n)
    fused = sum(kept.values()) + sum(work.values())
    pays = fused <= AUTO_MAX_FUSED_SHARE * unchunked_head_bytes(cfg.precision.dtype, N, vocab)
    return n if pays else 0


def with_loss_chunks(cfg: Config, n: int) -> Config:
    """A copy of `cfg` whose model.loss_chunks is `n` (the caller's config untouched)."""
    return cfg if cfg.model.loss_chunks == n else replace(
        cfg, model=replace(cfg.model, loss_chunks=n))
