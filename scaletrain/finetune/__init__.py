"""Starting training from trained weights: `init.from`, freezing and LoRA (issue #9).

The trainer calls three hooks: `resolve_init(cfg)` before it prepares data (the model
config and tokenizer come from the source), `converter(cfg)`, the freeze / LoRA
conversion it applies to the model on `meta` before parallelising it, and
`apply_init(model, cfg)` once the model is allocated (load the weights into the base,
draw the adapters).
"""

from scaletrain.finetune.init_from import (apply_init, converter, find_source,
                                           prepare_loaded_model, resolve_init, source_state,
                                           writes_every_weight)

__all__ = ["apply_init", "converter", "find_source", "prepare_loaded_model", "resolve_init",
           "source_state", "writes_every_weight"]
