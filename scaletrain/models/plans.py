"""Tensor-parallel plans per model family: {module path: ParallelStyle} for
`parallelize_module` (parallel/tensor.py explains the layout and the collectives).

Kept beside the models, outside them: the model code has no distributed import, and the
plan only names its modules. A plan is built for the modules the model (or a pipeline
stage of it) still has: parts a stage deleted (set to None, blocks removed from the
ModuleDict) are simply not in the plan.
"""

from __future__ import annotations

import torch.nn as nn

from scaletrain.models.tp_styles import fused_colwise, replicate_style


def gpt_tp_plan(model: nn.Module, *, loss_parallel: bool = True,
                sequence_parallel: bool = False) -> dict:
    """Megatron-style plan for models/gpt.py's GPT (or one pipeline stage of it).

    Residual stream between the sublayers: replicated (B, T, D) without sequence
    parallel; (B, T/tp, D) local slices with it (norms then run on their slice).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)

    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()  # layout of the residual stream
    plan: dict = {}
    if model.wte is not None:
        # Vocabulary-parallel embedding: rows of (V, D) sharded; partial lookups summed
        # (all-reduce, or reduce-scatter along T with SP).
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
        # The position table stays replicated; with SP each rank adds its T/tp rows.
        plan["wpe"] = replicate_style(Shard(0) if sp else None)
    for name in model.blocks.keys():
        b = f"blocks.{name}"
        plan[f"{b}.ln_1"] = SequenceParallel() if sp else replicate_style()
        plan[f"{b}.ln_2"] = SequenceParallel() if sp else replicate_style()
        if sp:
            for sub in ("attn", "mlp"):  # all-gather the sequence before the matmuls
                plan[f"{b}.{sub}"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                        desired_input_layouts=(Replicate(),))
        plan[f"{b}.attn.c_attn"] = fused_colwise(3)  # [Q; K; V] each split by heads
        plan[f"{b}.attn.c_proj"] = RowwiseParallel(output_layouts=stream)
        plan[f"{b}.mlp.c_fc"] = ColwiseParallel()
        plan[f"{b}.mlp.c_proj"] = RowwiseParallel(output_layouts=stream)
    if model.ln_f is not None:
        plan["ln_f"] = SequenceParallel() if sp else replicate_style()
    if model.lm_head is not None:
        # Column-parallel over the vocabulary (weight tied to wte's Shard(0) rows): logits
        # (B, T, V/tp) stay sharded for loss_parallel, else are all-gathered.
        plan["lm_head"] = ColwiseParallel(
            input_layouts=stream,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel)
    return plan
