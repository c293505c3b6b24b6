"""The Hugging Face side of the family contract: how a family's weights and config read
from and write to a `save_pretrained` directory (`ModelSpec.hf`, models/registry.py).

A family declares an `HFMap`; the generic reader (finetune/hf_import.py: config check,
shard-by-shard and slice-by-slice loading) and writer (checkpoint/hf_export.py: config,
sharded safetensors, tokenizer files) do the rest, so adding a family with HF checkpoints
needs its map and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class HFMap:
    # transformers class names (config.json "architectures") this family reads; the
    # first is what it writes unless the model config names another (hf_architecture).
    architectures: tuple[str, ...]
    # (config.json dict, its path for messages) -> scaletrain `model.*` fields, with
    # "name"; raises CheckpointError for a config this family cannot compute exactly.
    model_fields: Callable[[dict, str], dict]
    # HF tensor name -> scaletrain parameter name; None = not a weight (old buffers).
    to_ours: Callable[[str], str | None]
    # scaletrain parameter name -> HF tensor name.
    to_hf: Callable[[str], str]
    # (model config, end-of-text token id or None, beginning-of-text token id or None)
    # -> config.json dict; raises ConfigError when the run's model cannot be written as
    # that family.
    config_json: Callable[..., dict]
    # (end-of-text token string, beginning-of-text token string or None) ->
    # special_tokens_map.json entries.
    special_tokens: Callable[[str, "str | None"], dict]
    # (config.json model_type, the architecture it means): how a config.json without
    # "architectures" (older saves) is read; every architecture's, so a Qwen2 file that
    # names only its model_type is read as Qwen2 (q/k/v biases), not as a Llama.
    model_types: tuple[tuple[str, str], ...] = ()
    # Parameter-name suffixes whose HF tensor is stored (in, out): GPT-2's Conv1D.
    transposed: tuple[str, ...] = ()
    # Tensors stored one per expert (our name after to_ours) -> (our 3-D parameter
    # (E, in, out), expert index); each stored (out, in) as a Linear (models/moe_hf.py).
    stacked: Callable[[str], "tuple[str, int] | None"] | None = None
    # (model config, our name, tensor) -> {HF name: tensor} for export, where one tensor
    # is not one HF tensor under `to_hf(name)` (an expert stack written per expert);
    # None = to_hf for every tensor.
    tensors_to_hf: Callable[..., dict] | None = None
