"""The model families' config rules, judged by config/checks.py before anything is built.

They live here, below models/, because validation (config/) must not import the model
registry above it (tests/unit/test_layers.py); models/registry.py points each ModelSpec's
`check` at these functions, and tests/unit/test_family_contract.py checks that `kind` and
`blocks` below agree with the registry's specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ConfigError


def check_gpt(m: ModelConfig) -> None:
    if m.moe_experts:
        raise ConfigError("model.moe_experts: mixture-of-experts layers are built for "
                          "model.name='llama', not 'gpt'")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.n_head={m.n_head} must divide model.d_model={m.d_model}")


def check_llama(m: ModelConfig) -> None:
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise ConfigError(f"model.n_head={m.n_head} must be a multiple of "
                          f"model.n_kv_head={m.n_kv_head}")
    if not m.head_dim and m.d_model % m.n_head:
        raise ConfigError(f"model.n_head={m.n_head} must divide model.d_model={m.d_model} "
                          "(or set model.head_dim)")
    if (m.head_dim or m.d_model // m.n_head) % 2:
        raise ConfigError("the llama head dimension (model.head_dim, or d_model / n_head) "
                          "must be even: rotary embeddings rotate pairs of features")
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must "
                          f"exceed model.rope_low_freq_factor={m.rope_low_freq_factor}")
    check_moe(m)


def is_moe_layer(i: int, experts: int, every: int, first_dense: int) -> bool:
    """Block i holds an MoE feed-forward (Qwen-MoE's rule, after DeepSeek's dense first
    blocks): experts > 0, i >= first_dense and (i + 1) % every == 0."""
    return experts > 0 and i >= first_dense and (i + 1) % every == 0


def check_moe(m) -> None:
    """The model.moe_* rules of a model config (ConfigError, one line naming the field)."""
    defaults = {"moe_top_k": 2, "moe_d_ff": 0, "moe_shared_experts": 0, "moe_every": 1,
                "moe_first_dense": 0, "moe_router": "softmax", "moe_aux_loss": 0.0,
                "moe_z_loss": 0.0, "moe_capacity_factor": 0.0}
    if m.moe_experts == 0:
        set_ = [k for k, v in defaults.items() if getattr(m, k) != v]
        if set_:
            raise ConfigError(f"model.{set_[0]} is set but model.moe_experts=0 (a dense "
                              f"model); set model.moe_experts to use experts")
        return
    if m.moe_top_k > m.moe_experts:
        raise ConfigError(f"model.moe_top_k={m.moe_top_k} exceeds "
                          f"model.moe_experts={m.moe_experts}")
    if m.moe_capacity_factor < 0 or not math.isfinite(m.moe_capacity_factor):
        raise ConfigError(f"model.moe_capacity_factor={m.moe_capacity_factor} must be > 0 "
                          "(drop beyond capacity) or 0 (never drop)")
    if not any(is_moe_layer(i, m.moe_experts, m.moe_every, m.moe_first_dense)
               for i in range(m.n_layer)):
        raise ConfigError(f"no block is an MoE block: model.moe_first_dense="
                          f"{m.moe_first_dense} / model.moe_every={m.moe_every} leave all "
                          f"{m.n_layer} blocks dense")


@dataclass(frozen=True)
class FamilyRules:
    kind: str  # "text" or "image" (ModelSpec.kind)
    blocks: bool  # transformer blocks to checkpoint (ModelSpec.activation_block is set)
    check: Callable[[ModelConfig], None] | None = None  # the family's own field rules


FAMILY_RULES: dict[str, FamilyRules] = {
    "gpt": FamilyRules("text", True, check_gpt),
    "llama": FamilyRules("text", True, check_llama),
    "mlp": FamilyRules("image", False),
    "cnn": FamilyRules("image", False),
}
