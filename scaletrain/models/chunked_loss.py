"""The output head + cross-entropy computed chunk by chunk (`model.loss_chunks`), so the
(tokens x vocabulary) logits of a micro-batch never exist whole.

Two paths, the same loss and gradients (tests/unit/test_chunked_loss.py, fp64 1e-10):

- fused (`_HeadCrossEntropy`, a plain bias-free linear head on plain tensors: one
  process, DDP, FSDP2's unsharded weight, a pipeline's last stage): the normed hidden
  states are cut into `chunks` row pieces; for each, the logits, the summed fp32
  cross-entropy *and* both gradients (the softmax minus the one-hot is the logits'
  gradient) are made in the forward (Liger's fused linear cross-entropy). Nothing of a
  piece outlives it; the backward scales the two stored gradients (hidden-sized and
  weight-sized) by the incoming scalar. No recompute: the same three matmuls as the
  unchunked head.
- checkpointed (tensor parallel's DTensor head, or a head with hooks or wrapped by
  LoRA / weight norm): the final hidden states (B, T, D) are cut along the sequence and
  each piece runs final norm -> head module -> summed cross-entropy under non-reentrant
  `torch.utils.checkpoint`, which keeps the piece's input only and re-runs it in the
  backward (one extra head matmul per token). The head is called as its module, so TP's
  hooks (models/tp_styles.py `vocab_head`: DTensor layouts, the sequence-parallel
  all-gather) and loss_parallel's vocabulary-sharded cross-entropy run per chunk
  unchanged; no collective is written here. The checkpoint re-enters the forward's
  autocast state, so the recomputed logits are bitwise the forward's.

Sequence parallel (checkpointed path): the residual stream reaching the head is this
rank's (B, T/s, D) slice of the sequence (s = the TP degree) while the targets are the
whole (B, T); the head's input hook all-gathers a chunk's slices rank-major, so the
chunk's targets are taken the same way (s is read off the shapes: no process group).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scaletrain.models.losses import IGNORE_INDEX, sum_cross_entropy


def chunked_head_loss(norm: Callable[[torch.Tensor], torch.Tensor],
                      head: Callable[[torch.Tensor], torch.Tensor],
                      h: torch.Tensor, targets: torch.Tensor, chunks: int) -> torch.Tensor:
    """sum_cross_entropy(head(norm(h)), targets), `chunks` pieces of the sequence at a
    time. h (B, T_local, D) final hidden states (T_local = T, or T / tp under sequence
    parallel), targets (B, T) with IGNORE_INDEX for masked positions; `chunks` >= 1 (more
    than T_local acts as T_local)."""
    weight = getattr(head, "weight", None)
    if fusable(head, weight):
        x = norm(h)  # (B, T, D): small next to the logits
        grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return _HeadCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight,
                                       targets.reshape(-1), max(1, chunks), grads)
    B, t_local = h.shape[0], h.shape[1]
    s = targets.shape[1] // t_local  # sequence-parallel degree (1 without SP)
    y = targets.reshape(B, s, t_local)
    n = max(1, min(chunks, t_local))
    total = None
    for h_c, y_c in zip(h.tensor_split(n, dim=1), y.tensor_split(n, dim=2)):
        part = checkpoint(_piece, norm, head, h_c, y_c.reshape(B, -1), use_reentrant=False)
        total = part if total is None else total + part
    return total


def fusable(head, weight) -> bool:
    """The fused Function applies: a plain bias-free linear head on plain tensors, with no
    hooks (tensor parallel's DTensor weight and hooks, LoRA's wrapper or hooks on the
    head take the checkpointed path, which calls the module)."""
    return (type(head) is nn.Linear and head.bias is None and weight is not None
            and type(weight) in (torch.Tensor, nn.Parameter)
            and not (head._forward_hooks or head._forward_pre_hooks))


def _piece(norm, head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return sum_cross_entropy(head(norm(h)), targets)


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_cross_entropy(F.linear(h, weight), targets) over row pieces of h, with both
    gradients made in the forward, piece by piece (Liger's fused linear cross-entropy,
    Hsu et al. 2024): the softmax of a piece is its logits' gradient, so no logits are
    kept or recomputed and the backward only scales the two gradients by the incoming
    one (a scalar: the loss is the step's sum divided by its count). Plain tensors only.

    h (N, D) normed hidden states, weight (V, D), targets (N,) int64 with IGNORE_INDEX.
    The matmuls run as autocast runs them in the unchunked head (the forward is called
    under the step's autocast); the cross-entropy in fp32 (fp64 for fp64 runs)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunks: int, grads: bool):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=h.device)
        gh = torch.empty_like(h) if grads else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grads else None
        rows = torch.arange(h.shape[0], device=h.device)
        w = weight
        for r, h_c, y_c in zip(rows.tensor_split(chunks), h.tensor_split(chunks),
                               targets.tensor_split(chunks)):
            raw = F.linear(h_c, w)  # (n, V) in the compute dtype (autocast's)
            # The weight cast once for all pieces (autocast caches no cast here: the
            # forward of a Function runs without grad mode, where its cache is off).
            w = w.to(raw.dtype)
            # One log-softmax kernel over the piece (fewest passes over (n, V) in eager).
            lsm = torch.log_softmax(raw.to(acc), dim=-1)
            keep = y_c != IGNORE_INDEX
            y_safe = torch.where(keep, y_c, 0)
            total -= torch.where(keep, lsm.gather(1, y_safe[:, None]).squeeze(1), 0).sum()
            if grads:
                g = lsm.exp_()  # softmax, in place
                g[torch.arange(len(y_c), device=g.device), y_safe] -= 1
                g[~keep] = 0  # ignored positions: no gradient
                g = g.to(raw.dtype)  # the gradient reaching the matmul, as in autograd
                gh[r[0]:r[-1] + 1] = g @ w
                gw += (g.t() @ h_c.to(raw.dtype)).to(acc)
        ctx.grads = (gh, gw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g_out):
        gh, gw = ctx.grads
        return gh * g_out.to(gh.dtype), (gw * g_out).to(ctx.weight_dtype), None, None, None
