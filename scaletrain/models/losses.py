"""Losses as *sums* over target positions, so that any split of a batch (micro-batches,
ranks) can be normalised by the global target count of the step (DESIGN.md principle 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this (padding, masked prompts) are not trained on


def sum_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token (or sample) cross-entropies, computed in at least fp32 whatever the
    autocast (bf16/fp16 logits are upcast; fp64 verification runs stay fp64).

    logits (..., V), targets (...) int64 with IGNORE_INDEX for masked positions.
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(targets: torch.Tensor) -> torch.Tensor:
    """Number of positions that contribute to the loss (an int64 tensor; no host sync)."""
    return (targets != IGNORE_INDEX).sum()


def cross_entropy_peak_tensors(logit_bytes: int, grad: bool) -> tuple[int, ...]:
    """Bytes per logit of each (tokens, V) tensor alive at the peak of `sum_cross_entropy`
    on logits of `logit_bytes` (4 fp32, 2 bf16 / fp16, 8 fp64), which `plan` counts for
    an unchunked head (plan/memory.py). Read off torch.profiler's allocation events on
    the model's head (tests/unit/test_plan_head.py measures them):

    - with `grad` (training): the peak is in the backward, while log_softmax's saved
      output, the incoming gradient (nll_loss_backward's) and the outgoing one
      (_log_softmax_backward_data's) are alive, all three in the loss dtype (fp32, or
      fp64). The logits are not among them: nothing keeps them for the backward (the
      head's matmul saves its input and weight, the upcast saves nothing), so under
      autocast the bf16 logits are freed once their fp32 copy exists, and in fp32 the
      logits *are* the tensor log_softmax reads, freed when the forward returns. The
      forward's own peak (logits or their copy + log_softmax's output) is lower.
    - without (evaluation: the evaluator holds the logits): the logits, their fp32 copy
      where they are not fp32 already, and log_softmax's output."""
    loss_bytes = 8 if logit_bytes == 8 else 4
    if grad:
        return (loss_bytes,) * 3
    upcast = (loss_bytes,) if logit_bytes != loss_bytes else ()
    return (logit_bytes, *upcast, loss_bytes)
