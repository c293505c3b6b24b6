"""Models by name: how to build each one and what it costs per token or sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from scaletrain.config.schema import ModelConfig
from scaletrain.models.contract import PipelineSplit, TiedPairs, tie
from scaletrain.models.gpt import GPT, GPTConfig, gpt_flops_per_token
from scaletrain.models.plans import gpt_tp_plan
from scaletrain.models.vision import CNN, MLP


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "text" (targets are next tokens) or "image" (targets are class labels)
    build: Callable[[ModelConfig, dict], nn.Module]  # (model config, data facts) -> module
    flops_per_token: Callable[[nn.Module, int], float] | None = None
    # Family contract (models/contract.py): (head, embedding) parameter pairs that are one
    # tensor, and how the model splits into pipeline stages (None = no pipeline).
    tied: TiedPairs = ()
    pipeline: PipelineSplit | None = None
    # Tensor-parallel plan: (model, loss_parallel=, sequence_parallel=) -> {path: style}
    # for parallelize_module (models/plans.py); None = the family has no TP.
    tp_plan: Callable[..., dict] | None = None
    # What the plan measures its activations on (plan/activations.py): (model built on
    # meta, samples, seq_len) -> (one transformer block, its forward's inputs on meta);
    # None = no blocks to measure (the image families).
    activation_block: Callable[[nn.Module, int, int], tuple] | None = None


def _build_gpt(m: ModelConfig, facts: dict) -> GPT:
    return GPT(GPTConfig(vocab_size=m.vocab_size or facts["vocab_size"], seq_len=m.seq_len,
                         n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, d_ff=m.d_ff,
                         dropout=m.dropout, bias=m.bias, init_std=m.init_std))


def _gpt_block(model: GPT, samples: int, seq_len: int) -> tuple:
    """Block 0 and its input, the (B, T, D) residual stream (all blocks are alike)."""
    return model.blocks["0"], (torch.empty(samples, seq_len, model.config.d_model,
                                           device="meta"),)


def _build_mlp(m: ModelConfig, facts: dict) -> MLP:
    return MLP(facts["input_shape"], facts["num_classes"], m.hidden, m.dropout)


def _build_cnn(m: ModelConfig, facts: dict) -> CNN:
    return CNN(facts["input_shape"], facts["num_classes"], m.channels, m.n_blocks, m.dropout)


REGISTRY: dict[str, ModelSpec] = {
    "gpt": ModelSpec("gpt", "text", _build_gpt, gpt_flops_per_token,
                     tied=(("lm_head.weight", "wte.weight"),),
                     pipeline=PipelineSplit(first=("wte", "wpe"), last=("ln_f", "lm_head")),
                     tp_plan=gpt_tp_plan, activation_block=_gpt_block),
    "mlp": ModelSpec("mlp", "image", _build_mlp),
    "cnn": ModelSpec("cnn", "image", _build_cnn),
}


def spec_for(name: str) -> ModelSpec:
    """The registered family called `name` (model.name)."""
    return REGISTRY[name]


def spec_of(m: ModelConfig) -> ModelSpec:
    """The family of model config `m`."""
    return REGISTRY[m.name]


def build_model(m: ModelConfig, facts: dict, *, seed: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Construct on `meta` (no memory), materialise on `device`, then initialise."""
    spec = REGISTRY[m.name]
    with torch.device("meta"):
        model = spec.build(m, facts)
    materialize(model, device, seed, tied=spec.tied)
    return model.to(dtype=dtype)


def materialize(model: nn.Module, device: torch.device | str, seed: int, *,
                tied: TiedPairs) -> None:
    """Allocate a meta-built (possibly sharded) model on `device` and run its init;
    `tied`: its family's tied pairs (ModelSpec.tied)."""
    model.to_empty(device=device)
    tie(model, tied)  # to_empty gives each module its own tensor; re-share
    model.init_weights(seed)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
