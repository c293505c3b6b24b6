"""Starting training from trained weights: `init.from`, freezing and LoRA (issue #9).

The trainer calls two hooks: `resolve_init(cfg)` before it prepares data (the model
config and tokenizer come from the source) and `apply_init(model, cfg)` right after it
builds the model (load the weights, then freeze / LoRA converters).
"""

from scaletrain.finetune.init_from import (apply_init, find_source, prepare_loaded_model,
                                           resolve_init, source_state, writes_every_weight)

__all__ = ["apply_init", "find_source", "prepare_loaded_model", "resolve_init",
           "source_state", "writes_every_weight"]
