"""`model.loss_chunks = -1` (the default): whether a run's head + loss is chunked
(models/chunked_loss.py), decided once per run from its shape — the trainer
(train/trainer.py) and `plan` (plan/report.py) both resolve it here, so they agree.

The rule: chunk, into AUTO_CHUNKS pieces, when one micro-batch's fp32 logits (tokens x
vocabulary x 4 B, what the unchunked cross-entropy makes several of) reach
AUTO_MIN_LOGIT_BYTES, and only where the fused path runs and was measured: no tensor
parallelism (its checkpointed path recomputes the head: one more matmul per token), no
torch.compile (the compiled head + loss region is not tested chunked), the plain
next-token loss (distillation needs the whole logits, DPO takes its log-probs from the
logits). Below the threshold, or outside those, it resolves to 0: the whole logits.
"""

from __future__ import annotations

from dataclasses import replace

from scaletrain.config.schema import Config

AUTO = -1  # model.loss_chunks' default: decided here
# Why 32 MiB: it is glibc's largest dynamic mmap threshold (plan/malloc.py
# GLIBC_DEFAULT_MAX). Logits at or above it are mmapped afresh for every micro-batch
# and page-faulted in (as are their fp32 cross-entropy temporaries), which is what the
# fused head avoids: gpt-10m's 8 x 256 x 8192 logits (64 MiB) train 1.11x faster chunked
# (bench/chunked_loss.py, A/A 1.05). Below it they come from reused heap pages, and the
# head alone is slower chunked (--head-only: 0.80x), so nothing is gained there.
AUTO_MIN_LOGIT_BYTES = 32 << 20
AUTO_CHUNKS = 8  # the measured setting (bench/chunked_loss.py --chunks 8)


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
    T = cfg.model.seq_len
    return min(AUTO_CHUNKS, T) if micro * T * vocab * 4 >= AUTO_MIN_LOGIT_BYTES else 0


def with_loss_chunks(cfg: Config, n: int) -> Config:
    """A copy of `cfg` whose model.loss_chunks is `n` (the caller's config untouched)."""
    return cfg if cfg.model.loss_chunks == n else replace(
        cfg, model=replace(cfg.model, loss_chunks=n))
