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
from torch.utils.checkpoint import checkpoint

from scaletrain.models.losses import IGNORE_INDEX, cross_entropy_peak_tensors, sum_cross_entropy
from scaletrain.precision import dtype_bytes


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
    The matmuls run in the dtype autocast gives the unchunked head's (`_compute_dtype`;
    h and the weight cast once for all pieces); the cross-entropy in fp32 (fp64 runs
    fp64). Why it is this shape (bench/chunked_loss.py, CPU): the fewest passes over a
    piece's (n, V) logits and no fresh (n, V) allocation per piece (each costs page
    faults): the logits live in one buffer that every piece reuses and that ends as the
    piece's softmax - one-hot (`_softmax_minus_onehot`: an fp32 copy, log-softmax and
    softmax, each in place); ignored rows are zeroed in the (N, D) input and output of
    the gradient matmuls, not in the (n, V) softmax; both gradients are written into
    buffers made once (in-matmul accumulation for the fp32 / fp64 weight gradient)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunks: int, grads: bool):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        cdt = _compute_dtype(h, weight)
        N, (V, D) = h.shape[0], weight.shape
        keep = targets != IGNORE_INDEX
        y = torch.where(keep, targets, 0)
        total = torch.zeros((), dtype=acc, device=h.device)
        pieces = _piece_rows(N, chunks)
        block = _block_rows(pieces[0], V, acc.itemsize)
        with torch.autocast(h.device.type, enabled=False):  # the casts are made here, once
            hc, w = h.to(cdt), weight.to(cdt)
            z_buf = torch.empty((pieces[0], V), dtype=cdt, device=h.device)
            x_buf = None if cdt == acc else torch.empty((block, V), dtype=acc, device=h.device)
            cols = torch.arange(block, device=h.device)
            if grads:
                gh = torch.empty((N, D), dtype=cdt, device=h.device)  # as h in backward
                gw = torch.zeros((V, D), dtype=acc, device=h.device)
                # An ignored row's softmax is not zeroed: its row of h is, so it adds
                # nothing to the weight gradient, and its row of gh is zeroed at the end.
                h_kept = hc * keep[:, None].to(cdt)
                if cdt != acc:  # a piece's weight-gradient product and its fp32 copy
                    gw_part = torch.empty((V, D), dtype=cdt, device=h.device)
                    gw_up = torch.empty((V, D), dtype=acc, device=h.device)
            start = 0
            for n in pieces:
                rows = slice(start, start + n)
                z = torch.mm(hc[rows], w.t(), out=z_buf[:n])  # (n, V) logits
                for b in range(0, n, block):
                    r = slice(start + b, start + min(b + block, n))
                    total -= _softmax_minus_onehot(z[b:b + block], y[r], keep[r], x_buf,
                                                   cols, grads)
                start += n
                if not grads:
                    continue
                torch.mm(z, w, out=gh[rows])
                if cdt == acc:
                    gw.addmm_(z.t(), h_kept[rows])
                else:  # no CPU matmul writes a bf16 product into fp32: product, copy, sum
                    gw.add_(gw_up.copy_(torch.mm(z.t(), h_kept[rows], out=gw_part)))
            if grads:
                gh.mul_(keep[:, None])
        ctx.grads = (gh, gw) if grads else None
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, g_out):
        if ctx.grads is None:
            raise RuntimeError("backward through the fused head + loss a second time "
                               "(models/chunked_loss.py scales its gradients in place)")
        gh, gw = ctx.grads
        ctx.grads = None  # gw is scaled in place below: a second backward must not rescale
        h_dtype, w_dtype = ctx.dtypes
        # gh is cast before the scaling, so the scaled value is rounded in h's dtype only
        gh = gh.to(h_dtype)
        return gh.mul_(g_out.to(h_dtype)), gw.mul_(g_out).to(w_dtype), None, None, None


# The fp32 copy of a bf16 / fp16 piece's logits is made this many bytes of rows at a
# time, so it stays bounded (2048 tokens x 128k vocabulary in 8 chunks: 32 rows, not one
# whole piece's 128 MiB). Not smaller: each block is a few more kernel launches, and on
# a loaded CPU those cost more than cache misses save (bench/chunked_loss.py --head-only,
# gpt-10m shape: 1 MiB blocks 0.39x unchunked, 4 MiB 0.67x, one block per piece 0.80x).
# `model.loss_chunks` still says how many logits exist at once.
_BLOCK_BYTES = 16 << 20


def _block_rows(piece: int, vocab: int, acc_bytes: int) -> int:
    """Rows of a piece whose fp32 (fp64) logits copy is made at once (_BLOCK_BYTES)."""
    return max(1, min(piece, _BLOCK_BYTES // (vocab * acc_bytes)))


def fused_buffer_bytes(rows: int, vocab: int, d_model: int, chunks: int,
                       compute_bytes: int, acc_bytes: int, input_bytes: int,
                       weight_bytes: int) -> tuple[dict[str, float], dict[str, float]]:
    """The tensors `chunked_head_loss`'s fused path makes for one micro-batch with
    gradients, one entry per tensor (bytes), as `_HeadCrossEntropy.forward` allocates
    them: (held to the backward, alive during the forward only). `plan` counts the
    fused head from this (plan/memory.py `fused_head`), so a buffer added to the forward
    belongs here too (tests/unit/test_chunked_loss.py checks the two agree, tensor by
    tensor).

    rows N tokens, vocab V, d_model D; compute_bytes: the matmul dtype's (autocast's,
    `_compute_dtype`), acc_bytes: the cross-entropy's (4, fp64 runs 8), input_bytes:
    the normed hidden states' (ln_f's output dtype), weight_bytes: the head weight's."""
    N, V, D, cb, acc = rows, vocab, d_model, compute_bytes, acc_bytes
    piece = _piece_rows(N, chunks)[0]
    kept = {"input_grad": N * D * cb,  # gh, cast to the input's dtype in the backward
            "weight_grad": V * D * acc}  # gw, accumulated over the pieces
    work = {"normed_input": N * D * input_bytes,  # x = norm(h), the Function's input
            "logits": piece * V * cb,  # z_buf: every piece's logits, then its softmax
            "input_kept": N * D * cb}  # h_kept: the ignored rows zeroed
    if cb != acc:  # a bf16 / fp16 piece: the fp32 copy in blocks, the split gw update
        work["fp32_block"] = _block_rows(piece, V, acc) * V * acc  # x_buf
        work["weight_grad_part"] = V * D * cb  # gw_part
        work["weight_grad_up"] = V * D * acc  # gw_up
    if cb != input_bytes:
        work["input_cast"] = N * D * cb  # hc = h.to(cdt)
    if cb != weight_bytes:
        work["weight_cast"] = V * D * cb  # w = weight.to(cdt)
    return kept, work


def fused_head_tensors(precision: str, rows: int, vocab: float, d_model: int,
                       chunks: int) -> tuple[dict[str, float], dict[str, float]]:
    """`fused_buffer_bytes` of a run in precision.dtype `precision`: matmuls in its
    compute dtype (autocast's, or the parameters'), cross-entropy in fp32 (fp64 runs
    fp64), the normed input in the residual stream's dtype (the parameters': LayerNorm
    and RMSNorm run in fp32 under CPU autocast), the head weight a parameter."""
    pb, ab = dtype_bytes(precision)
    return fused_buffer_bytes(rows, vocab, d_model, chunks, ab, 8 if ab == 8 else 4, pb, pb)


def unchunked_head_bytes(precision: str, rows: int, vocab: float) -> float:
    """The unchunked head's fp32 cross-entropy tensors at their peak, V x 12 per token
    (losses.py `cross_entropy_peak_tensors`: log_softmax's output, the incoming and the
    outgoing fp32 gradient, in the backward)."""
    return rows * vocab * sum(cross_entropy_peak_tensors(dtype_bytes(precision)[1], True))


def _softmax_minus_onehot(z, y, keep, x_buf, cols, grads: bool) -> torch.Tensor:
    """Rows z (m, V) of logits in the matmul dtype, targets y (m,) (ignored ones already
    0), keep (m,): returns the sum of the kept rows' log-probabilities of their targets
    (fp32 / fp64) and, with grads, overwrites z with softmax - one-hot, rounded once to
    z's dtype, as autograd rounds the unchunked logits' gradient. x_buf: an fp32 buffer
    of at least m rows when z is bf16 / fp16, None when z is already fp32 / fp64."""
    m = z.shape[0]
    # In place (out= the input): the last-dim kernels finish reading a row before
    # writing it (tests/unit/test_chunked_loss.py checks the values in fp64).
    lsm = z if x_buf is None else x_buf[:m].copy_(z)
    torch.log_softmax(lsm, -1, out=lsm)
    picked = lsm.gather(1, y[:, None]).squeeze(1)  # (m,)
    if grads:
        if x_buf is None:
            lsm.exp_()  # z is now the softmax
        else:  # one kernel: reads bf16, computes in fp32, writes bf16(softmax)
            torch.softmax(z, -1, out=z)
        z[cols[:m], y] = (picked.exp() - 1).to(z.dtype)
    return torch.where(keep, picked, 0).sum()


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(h, weight) computes in here: autocast's for fp32/bf16/fp16
    inputs when autocast is on for the device (the unchunked head's matmul), else the
    promoted dtype of the two (fp64 verification runs, bf16-pure)."""
    dev = h.device.type
    low = (torch.float32, torch.bfloat16, torch.float16)
    if torch.is_autocast_enabled(dev) and h.dtype in low and weight.dtype in low:
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _piece_rows(rows: int, chunks: int) -> list[int]:
    """Row counts of the pieces: `chunks` near-equal ones, the larger first (as
    tensor_split cuts); more chunks than rows acts as one row each."""
    k = max(1, min(chunks, rows))
    q, r = divmod(rows, k)
    return [q + 1] * r + [q] * (k - r)
