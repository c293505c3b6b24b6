"""Full (unsharded) model weights in and out of a possibly sharded model.

The run directory's safetensors files hold full tensors. Under FSDP2 the parameters
are DTensor shards, so writing needs an all-gather (a collective: *every* rank calls
`full_state_dict`, rank 0 writes) and reading needs a re-shard. Both go through
`torch.distributed.checkpoint.state_dict`, which also strips wrapper prefixes.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _is_distributed(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """name -> full CPU tensor. Collective when `model` is sharded (call on all ranks).

    The full tensors land on global rank 0 only (the others get an empty dict), unless
    `every_rank`: a pipeline stage's FSDP2 ranks, rank 0 of none of which holds a later
    stage, then each get their stage's tensors, gathered one at a time."""
    if not _is_distributed(model):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if every_rank:  # sharded DTensors with the wrapper-free names, each made full
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu")
                for k, v in get_model_state_dict(model).items()}

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into `model`, sharding them if it is sharded (non-strict:
    tied weights are stored once)."""
    if not _is_distributed(model):
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                strict=False))
