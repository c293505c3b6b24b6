"""The model families' config rules, judged by config/checks.py before anything is built.

They live here, below models/, because validation (config/) must not import the model
registry above it (tests/unit/test_layers.py); models/registry.py points each ModelSpec's
`check` at these functions, and tests/unit/test_family_contract.py checks that `kind` and
`blocks` below agree with the registry's specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ConfigError


def check_gpt(m: ModelConfig) -> None:
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
