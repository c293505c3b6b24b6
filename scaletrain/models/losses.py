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
