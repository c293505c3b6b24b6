"""Structured-pruning units per model family: which rows and columns of a block's
linears belong to each attention unit and each MLP channel (`ModelSpec.prune_units`,
used by compress/prune.py), so pruning drops whole units and the model still runs.

Kept beside the models like the TP plans (models/plans.py): the model code is not
touched, the units only name its modules. Both attentions read their head counts from
their projections' shapes, so a block rebuilt with fewer units runs as fewer heads.

- GPT: a unit is one head: its rows of c_attn's [Q | K | V] (each part d_local rows,
  head h at h·dh) and its columns of attn.c_proj; an MLP channel is a c_fc row and an
  mlp.c_proj column.
- Llama (GQA): a unit is one key/value group — the kv head and the n_head / n_kv_head
  query heads that attend with it (SDPA's enable_gqa pairs query head h with kv head
  h // group) — so heads are kept in whole kv groups: its rows of q_proj (and q's bias),
  k_proj, v_proj, its columns of o_proj; an MLP channel is a gate_proj and an up_proj
  row and a down_proj column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Slices:
    path: str  # a linear inside the block ("attn.c_attn")
    dim: int  # 0: output rows (the bias follows), 1: input columns
    index: torch.Tensor  # (units, width): the indices along `dim` of each unit


@dataclass(frozen=True)
class PruneUnits:
    heads_per_unit: int  # attention heads one unit holds
    attention: tuple[Slices, ...]
    mlp: tuple[Slices, ...]


def _runs(units: int, width: int, offset: int = 0) -> torch.Tensor:
    """(units, width) indices: unit u is offset + u·width .. + width - 1."""
    return offset + torch.arange(units * width).view(units, width)


def gpt_prune_units(block: nn.Module, config) -> PruneUnits:
    attn, mlp = block.attn, block.mlp
    dh = config.d_model // config.n_head  # head width never changes; the count does
    d_local = attn.c_attn.weight.shape[0] // 3
    heads = d_local // dh
    qkv = torch.cat([_runs(heads, dh, part * d_local) for part in range(3)], dim=1)
    ff = mlp.c_fc.weight.shape[0]
    return PruneUnits(1, (Slices("attn.c_attn", 0, qkv), Slices("attn.c_proj", 1,
                                                                 _runs(heads, dh))),
                      (Slices("mlp.c_fc", 0, _runs(ff, 1)),
                       Slices("mlp.c_proj", 1, _runs(ff, 1))))


def llama_prune_units(block: nn.Module, config) -> PruneUnits:
    attn, mlp = block.self_attn, block.mlp
    hd = config.hd
    groups = attn.k_proj.weight.shape[0] // hd
    per = attn.q_proj.weight.shape[0] // hd // groups  # query heads per kv head
    q, kv = _runs(groups, per * hd), _runs(groups, hd)
    ff = mlp.gate_proj.weight.shape[0]
    return PruneUnits(per, (Slices("self_attn.q_proj", 0, q), Slices("self_attn.k_proj", 0, kv),
                            Slices("self_attn.v_proj", 0, kv), Slices("self_attn.o_proj", 1, q)),
                      (Slices("mlp.gate_proj", 0, _runs(ff, 1)),
                       Slices("mlp.up_proj", 0, _runs(ff, 1)),
                       Slices("mlp.down_proj", 1, _runs(ff, 1))))
