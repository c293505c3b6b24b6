"""Pruning a trained GPT.

- `magnitude`: global unstructured L1 pruning of every linear weight inside the blocks
  with `torch.nn.utils.prune.global_unstructured` (the smallest |w| across all of them
  are zeroed, so layers lose different fractions). Embeddings and the tied head are
  left dense. The masks stay attached (forward pre-hooks) during an optional short
  fine-tune, so pruned weights stay zero, then `prune.remove` makes them permanent.
- `structured`: drop whole attention heads and MLP channels, ranked per block by the
  L2 norm of the weights that read and write them, and rebuild the linear layers with
  fewer rows / columns: the matrices really shrink. The GPT's attention reads its head
  count from `c_attn.weight` (models/gpt.py: `n_head = self.n_head * d_local // D`),
  so keeping k of H heads of unchanged width d_head = D/H runs as k heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the transformer blocks."""
    return [(n, m) for n, m in model.named_modules()
            if n.startswith("blocks.") and isinstance(m, nn.Linear)]


def magnitude_prune(model: nn.Module, amount: float) -> None:
    """Attach global L1 masks zeroing `amount` of all block linear weights (in place)."""
    params = [(m, "weight") for _, m in block_linears(model)]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)


def make_permanent(model: nn.Module) -> None:
    """Fold masks into the weights and drop the hooks (`weight_orig * mask` -> weight)."""
    for _, m in block_linears(model):
        if tprune.is_pruned(m):
            tprune.remove(m, "weight")


def sparsity(model: nn.Module) -> dict:
    """Zero fractions: of the pruned (block linear) weights and of all parameters."""
    lin_zero = lin_total = 0
    for _, m in block_linears(model):
        w = m.weight
        lin_zero += int((w == 0).sum())
        lin_total += w.numel()
    seen, all_zero, all_total = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            all_zero += int((p == 0).sum())
            all_total += p.numel()
    return {"linear_sparsity": lin_zero / max(lin_total, 1),
            "total_sparsity": all_zero / max(all_total, 1)}


# -- structured ------------------------------------------------------------------------
def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m


def keep_counts(n_head: int, d_ff: int, amount: float) -> tuple[int, int]:
    """Heads and MLP channels kept per block for a pruned fraction `amount` (>= 1 each)."""
    return max(1, round(n_head * (1 - amount))), max(1, round(d_ff * (1 - amount)))


@torch.no_grad()
def shrink_block(block: nn.Module, n_head: int, keep_heads: list[int] | int,
                 keep_ff: list[int] | int) -> None:
    """Rebuild one block's attention and MLP linears with only the kept heads / channels.

    With ints instead of index lists the first k are kept (used when loading an
    artefact: only the shapes matter there, the weights are loaded afterwards).
    c_attn (3D, D) rows are [Q | K | V], each H heads of d_head rows; c_proj (D, D)
    columns follow the heads; c_fc (F, D) rows and mlp.c_proj (D, F) columns follow the
    MLP channels.
    """
    attn, mlp = block.attn, block.mlp
    D = attn.c_proj.weight.shape[0]
    dh = D // n_head  # head width never changes; only the number of heads does
    if isinstance(keep_heads, int):
        keep_heads = list(range(keep_heads))
    if isinstance(keep_ff, int):
        keep_ff = list(range(keep_ff))
    cols = torch.tensor([h * dh + i for h in keep_heads for i in range(dh)])
    d_local = attn.c_attn.weight.shape[0] // 3
    rows = torch.cat([cols + part * d_local for part in range(3)])
    ca, cp = attn.c_attn, attn.c_proj
    attn.c_attn = _linear(ca.weight[rows], ca.bias[rows] if ca.bias is not None else None)
    attn.c_proj = _linear(cp.weight[:, cols], cp.bias)
    ff = torch.tensor(sorted(keep_ff))
    fc, fp = mlp.c_fc, mlp.c_proj
    mlp.c_fc = _linear(fc.weight[ff], fc.bias[ff] if fc.bias is not None else None)
    mlp.c_proj = _linear(fp.weight[:, ff], fp.bias)


@torch.no_grad()
def structured_prune(model: nn.Module, amount: float) -> dict:
    """Keep the highest-norm heads and MLP channels of each block; returns
    {"heads": kept per block, "d_ff": kept per block} (the same in every block)."""
    c = model.config
    H, D = c.n_head, c.d_model
    dh = D // H
    k_heads, k_ff = keep_counts(H, c.ff, amount)
    for block in model.blocks.values():
        wa, wp = block.attn.c_attn.weight, block.attn.c_proj.weight
        d_local = wa.shape[0] // 3
        # Importance of head h: norm of its Q, K, V rows and of its c_proj columns.
        score = torch.stack([
            wa[[r + part * d_local for part in range(3) for r in range(h * dh, (h + 1) * dh)]]
            .pow(2).sum() + wp[:, h * dh:(h + 1) * dh].pow(2).sum() for h in range(H)])
        heads = sorted(torch.topk(score, k_heads).indices.tolist())
        # Importance of MLP channel j: ||c_fc row j|| * ||c_proj column j|| (the size of
        # the path through it, for unit input).
        fc, fp = block.mlp.c_fc.weight, block.mlp.c_proj.weight
        ch = fc.norm(dim=1) * fp.norm(dim=0)
        keep = sorted(torch.topk(ch, k_ff).indices.tolist())
        shrink_block(block, H, heads, keep)
    return {"heads": k_heads, "d_ff": k_ff}


def shrink_to(model: nn.Module, heads: int, d_ff: int) -> nn.Module:
    """Give a freshly built GPT the shapes of a structured-pruned artefact."""
    for block in model.blocks.values():
        shrink_block(block, model.config.n_head, heads, d_ff)
    return model


def structured_param_count(c, heads: int, d_ff: int) -> int:
    """Parameters a GPT of config `c` has after keeping `heads` and `d_ff` per block
    (what `structured` claims; the tests compare it with the real count)."""
    D, dh = c.d_model, c.d_model // c.n_head
    a = heads * dh
    b = 1 if c.bias else 0
    per_block = (3 * a * D + 3 * a * b) + (a * D + D * b) + (d_ff * D + d_ff * b) \
        + (d_ff * D + D * b) + 2 * (D + D * b)
    return c.vocab_size * D + c.seq_len * D + c.n_layer * per_block + D + D * b
