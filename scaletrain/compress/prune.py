"""Pruning a trained text model (any family with `ModelSpec.prune_units`).

- `magnitude`: global unstructured L1 pruning of every linear weight inside the blocks
  with `torch.nn.utils.prune.global_unstructured` (the smallest |w| across all of them
  are zeroed, so layers lose different fractions). Embeddings and the tied head are
  left dense. The masks stay attached (forward pre-hooks) during an optional short
  fine-tune, so pruned weights stay zero, then `prune.remove` makes them permanent.
- `structured`: drop whole attention units (GPT: heads; llama: key/value groups, a kv
  head with its query heads) and MLP channels, ranked per block by the L2 norm of the
  weights that read and write them, and rebuild the linear layers with fewer rows /
  columns: the matrices really shrink. Which rows and columns each unit holds is the
  family's fact (models/prune_units.py); both attentions read their head counts from
  their projections' shapes, so keeping k units of unchanged head width runs as k.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from scaletrain.models.prune_units import PruneUnits, Slices
from scaletrain.models.registry import spec_of


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


def keep_counts(n_units: int, d_ff: int, amount: float) -> tuple[int, int]:
    """Attention units and MLP channels kept per block for a pruned fraction `amount`
    (>= 1 each)."""
    return max(1, round(n_units * (1 - amount))), max(1, round(d_ff * (1 - amount)))


def _weight(block: nn.Module, s: Slices) -> torch.Tensor:
    return block.get_submodule(s.path).weight


def _unit_norms(block: nn.Module, s: Slices) -> torch.Tensor:
    """(units,) squared L2 norm of each unit's rows / columns of one linear."""
    units, width = s.index.shape
    sq = _weight(block, s).index_select(s.dim, s.index.flatten()).pow(2)
    if s.dim == 0:  # (units·width, in)
        return sq.reshape(units, -1).sum(1)
    return sq.reshape(sq.shape[0], units, width).sum((0, 2))  # (out, units·width)


@torch.no_grad()
def shrink_block(block: nn.Module, units: PruneUnits, keep_units: list[int] | int,
                 keep_ff: list[int] | int) -> None:
    """Rebuild one block's attention and MLP linears with only the kept units / channels
    (models/prune_units.py says which rows and columns each holds).

    With ints instead of index lists the first k are kept (used when loading an
    artefact: only the shapes matter there, the weights are loaded afterwards).
    """
    for slices, keep in ((units.attention, keep_units), (units.mlp, keep_ff)):
        keep = list(range(keep)) if isinstance(keep, int) else sorted(keep)
        for s in slices:
            old = block.get_submodule(s.path)
            # Ascending: a fused layout ([Q | K | V], each by head) keeps its order.
            idx = s.index[keep].flatten().sort().values
            bias = old.bias
            if bias is not None and s.dim == 0:
                bias = bias.index_select(0, idx)
            parent, _, leaf = s.path.rpartition(".")
            setattr(block.get_submodule(parent), leaf,
                    _linear(old.weight.index_select(s.dim, idx), bias))


@torch.no_grad()
def structured_prune(model: nn.Module, amount: float, units_of: Callable) -> dict:
    """Keep the highest-norm attention units and MLP channels of each block; returns
    {"heads": query heads kept per block, "d_ff": channels kept per block} (the same in
    every block). `units_of`: the family's ModelSpec.prune_units.

    Importance of an attention unit: the squared norm of all its rows and columns; of
    an MLP channel: the product of its rows' and columns' norms (the size of the path
    through it, for unit input)."""
    first = units_of(model.blocks["0"], model.config)
    k_units, k_ff = keep_counts(len(first.attention[0].index), len(first.mlp[0].index), amount)
    for block in model.blocks.values():
        units = units_of(block, model.config)
        score = sum(_unit_norms(block, s) for s in units.attention)
        keep = torch.topk(score, k_units).indices.tolist()
        ch = torch.stack([_unit_norms(block, s) for s in units.mlp]).sqrt().prod(0)
        shrink_block(block, units, keep, torch.topk(ch, k_ff).indices.tolist())
    return {"heads": k_units * first.heads_per_unit, "d_ff": k_ff}


def shrink_to(model: nn.Module, heads: int, d_ff: int, units_of: Callable) -> nn.Module:
    """Give a freshly built model the shapes of a structured-pruned artefact."""
    for block in model.blocks.values():
        units = units_of(block, model.config)
        shrink_block(block, units, heads // units.heads_per_unit, d_ff)
    return model


def structured_param_count(model_cfg, vocab: int, heads: int, d_ff: int) -> int:
    """Parameters the model of `model_cfg` has after keeping `heads` and `d_ff` per
    block (what `structured` claims), counted on a copy built on meta and shrunk to
    those shapes (tied tensors once)."""
    spec = spec_of(model_cfg)
    with torch.device("meta"):
        model = spec.build(model_cfg, {"vocab_size": vocab})
        shrink_to(model, heads, d_ff, spec.prune_units)
    return sum(p.numel() for p in model.parameters())
