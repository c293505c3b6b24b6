"""The output head + cross-entropy computed chunk by chunk (`model.loss_chunks`), so the
(tokens x vocabulary) logits of a micro-batch never exist whole.

The final hidden states (B, T, D) are cut along the sequence into `chunks` pieces; each
piece runs final norm -> head -> fp32 summed cross-entropy (models/losses.py) under
non-reentrant `torch.utils.checkpoint`, which keeps only the piece's hidden states (a
view of the input) and re-runs norm + head in the backward. So one chunk's logits and
their fp32 temporaries are alive at a time, forward and backward, for one extra head
matmul per token (as torchtitan's and Liger's chunked / fused losses trade). The
checkpoint re-enters the autocast state of the forward, so the recomputed logits are
bitwise those of the forward.

Why checkpoint and not a hand-written autograd.Function over (hidden, weight, targets):
the head is called as its module, so tensor parallel's hooks (models/tp_styles.py
`vocab_head`: DTensor layouts, the all-gather of a sequence-parallel stream) and
loss_parallel's vocabulary-sharded cross-entropy run per chunk unchanged, on every
family and with a tied or untied weight; a Function would have to re-implement the
sharded log-softmax with explicit collectives inside the model. Measured against the
Function in bench/chunked_loss.py.

Sequence parallel: the residual stream reaching the head is this rank's (B, T/s, D)
slice of the sequence (s = the TP degree) while the targets are the whole (B, T); the
head's input hook all-gathers a chunk's slices rank-major, so the chunk's targets are
taken the same way (the ratio s is read off the shapes: no process group here).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from scaletrain.models.losses import sum_cross_entropy


def chunked_head_loss(norm: Callable[[torch.Tensor], torch.Tensor],
                      head: Callable[[torch.Tensor], torch.Tensor],
                      h: torch.Tensor, targets: torch.Tensor, chunks: int) -> torch.Tensor:
    """sum_cross_entropy(head(norm(h)), targets), `chunks` pieces of the sequence at a
    time. h (B, T_local, D) final hidden states (T_local = T, or T / tp under sequence
    parallel), targets (B, T) with IGNORE_INDEX for masked positions; `chunks` >= 1 (more
    than T_local acts as T_local)."""
    B, t_local = h.shape[0], h.shape[1]
    s = targets.shape[1] // t_local  # sequence-parallel degree (1 without SP)
    y = targets.reshape(B, s, t_local)
    n = max(1, min(chunks, t_local))
    total = None
    for h_c, y_c in zip(h.tensor_split(n, dim=1), y.tensor_split(n, dim=2)):
        part = checkpoint(_piece, norm, head, h_c, y_c.reshape(B, -1), use_reentrant=False)
        total = part if total is None else total + part
    return total


def _piece(norm, head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return sum_cross_entropy(head(norm(h)), targets)
