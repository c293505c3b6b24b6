"""After training: distillation, pruning, quantization, artefacts and the report (the LoRA
adapters they merge are finetune/lora.py).

Each technique is a model converter (`convert(model)`, DESIGN.md principle 8) or a loss
hook, applied from outside the model; `pipeline.py` runs them for `scaletrain compress`.
"""
