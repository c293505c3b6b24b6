"""Model families (plain `nn.Module`s) and the registry that builds them by name."""

from scaletrain.models.gpt import GPT, GPTConfig
from scaletrain.models.registry import (REGISTRY, ModelSpec, build_model, count_params,
                                         materialize, spec_for, spec_of)

__all__ = ["GPT", "GPTConfig", "REGISTRY", "ModelSpec", "build_model", "count_params",
           "materialize", "spec_for", "spec_of"]
