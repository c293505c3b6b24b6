"""The family contract: the facts a model family declares in its `ModelSpec`
(models/registry.py) beyond how to build it, and the helpers that apply them, so that
parallel/, checkpoint/, train/ and compress/ read facts instead of sniffing a module.

Tied weights: `ModelSpec.tied` lists (head parameter, embedding parameter) name pairs —
GPT's `(("lm_head.weight", "wte.weight"),)`: the head *is* the embedding. A tied head's
module stores nothing of its own (a weights file holds the embedding once); after
anything that gives modules new tensors (`to_empty`, tensor parallelism, a load) the
pairs are re-shared with `tie`. A pipeline stage holding the head without its embedding
keeps its own copy (`tied_copies`), which parallel/pipeline_step.py keeps identical.

Pipeline split: `ModelSpec.pipeline` (a `PipelineSplit`) says how the model splits into
stages: its repeated blocks live in `model.blocks`, an `nn.ModuleDict` keyed "0".."n-1"
(names survive the split; the same attribute activation checkpointing, FSDP and compile
wrap), `first` names the modules only the first stage keeps and `last` those only the
last keeps (the others set them to None, and the model's forward passes through what is
None), `depth` / `width` read the block count and the hidden state's width between
stages from the model config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

TiedPairs = tuple[tuple[str, str], ...]  # ((head parameter, embedding parameter), ...)


def n_layer(m) -> int:
    return m.n_layer


def d_model(m) -> int:
    return m.d_model


@dataclass(frozen=True)
class PipelineSplit:
    first: tuple[str, ...]  # modules only the first stage keeps (inputs: embeddings)
    last: tuple[str, ...]  # modules only the last stage keeps (outputs: norm, head)
    depth: Callable = n_layer  # model config -> number of blocks
    width: Callable = d_model  # model config -> features of the hidden state (B, T, width)


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path`, or None where a stage deleted it (or it is absent)."""
    m = model
    for part in path.split(".") if path else ():
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def param_at(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter called `name` ("lm_head.weight"), or None where its module is gone."""
    path, _, leaf = name.rpartition(".")
    owner = submodule(model, path)
    return None if owner is None else getattr(owner, leaf, None)


def tie(model: nn.Module, pairs: TiedPairs) -> None:
    """Make each head parameter the very tensor of its embedding (where both are here)."""
    for head, emb in pairs:
        path, _, leaf = head.rpartition(".")
        owner, weight = submodule(model, path), param_at(model, emb)
        if owner is not None and weight is not None:
            setattr(owner, leaf, weight)


def head_modules(pairs: TiedPairs) -> set[str]:
    """Paths of the modules whose weight is a tied head ({"lm_head"} for GPT)."""
    return {head.rpartition(".")[0] for head, _ in pairs}


def stored_once(key: str, pairs: TiedPairs) -> bool:
    """Whether state-dict `key` belongs to a tied head, i.e. is stored as its embedding
    (a weights file leaves it out)."""
    return any(key.startswith(m + ".") for m in head_modules(pairs))


def tied_copies(model: nn.Module, pairs: TiedPairs) -> dict[str, str]:
    """{head parameter: embedding parameter} for the heads `model` holds without their
    embedding (a pipeline's last stage): copies kept identical to the embedding."""
    return {head: emb for head, emb in pairs
            if param_at(model, head) is not None and param_at(model, emb) is None}


def shared_names(model: nn.Module) -> dict[str, str]:
    """{later name: first name} of the parameters a built model shares (its ties, read
    from its tensors: the same object under two names)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out
