"""Tensor-parallel plans per model family: {module path: ParallelStyle} for
`parallelize_module` (parallel/tensor.py explains the layout and the collectives).

Kept beside the models, outside them: the model code has no distributed import, and the
plan only names its modules. A plan is built for the modules the model (or a pipeline
stage of it) still has: parts a stage deleted (set to None, blocks removed from the
ModuleDict) are simply not in the plan.
"""

from __future__ import annotations

import torch.nn as nn

from scaletrain.models.moe import GroupedExperts, MoE
from scaletrain.models.tp_styles import (fused_colwise, replicate_style, replicated_experts,
                                         vocab_embedding, vocab_head)


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
        plan["wte"] = vocab_embedding(stream)
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
    if model.lm_head is not None:  # weight tied to wte's rows
        plan["lm_head"] = vocab_head(stream, loss_parallel)
    return plan


def llama_tp_plan(model: nn.Module, *, loss_parallel: bool = True,
                  sequence_parallel: bool = False) -> dict:
    """Megatron-style plan for models/llama.py's Llama (or one pipeline stage of it).

    q/k/v are separate linears, each column-parallel over its heads (rank r holds query
    heads r·Hq/tp.. and kv heads r·Hkv/tp..: tp divides n_kv_head, so every rank's query
    heads find their kv group locally); o_proj and down_proj row-parallel; gate/up
    column-parallel. The rotary angles are computed in the forward from the full
    sequence length (of the token ids) and need no plan. With SP the residual stream is
    (B, T/tp, D) and the sublayers' inputs are all-gathered (PrepareModuleInput), as in
    the GPT plan; the per-head q/k norms (qk_norm) see head-sharded (B, T, H/tp, hd)
    tensors, so their replicated weight takes its gradient summed over the tp ranks.
    An MoE block's `mlp` gets `moe_tp_plan` instead of the dense MLP's entries.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)

    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()
    norm = (lambda: SequenceParallel()) if sp else replicate_style
    plan: dict = {}
    if model.embed_tokens is not None:
        plan["embed_tokens"] = vocab_embedding(stream)
    for name in model.blocks.keys():
        b = f"blocks.{name}"
        plan[f"{b}.input_layernorm"] = norm()
        plan[f"{b}.post_attention_layernorm"] = norm()
        if sp:  # attention's inputs: (x, cos, sin, mask); only x is sequence-sharded
            plan[f"{b}.self_attn"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None))
            plan[f"{b}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                  desired_input_layouts=(Replicate(),))
            # (an MoE layer's own gather and scatter replace this: moe_tp_plan)
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan[f"{b}.self_attn.{proj}"] = ColwiseParallel()
        attn = model.blocks[name].self_attn
        if attn.q_norm is not None:  # (B, T, H/tp, hd): sharded on the head dim
            plan[f"{b}.self_attn.q_norm"] = SequenceParallel(sequence_dim=2,
                                                             use_local_output=True)
            plan[f"{b}.self_attn.k_norm"] = SequenceParallel(sequence_dim=2,
                                                             use_local_output=True)
        plan[f"{b}.self_attn.o_proj"] = RowwiseParallel(output_layouts=stream)
        mlp = model.blocks[name].mlp
        if isinstance(mlp, MoE):
            plan.update(moe_tp_plan(f"{b}.mlp", mlp, sequence_parallel=sp))
        else:
            plan[f"{b}.mlp.gate_proj"] = ColwiseParallel()
            plan[f"{b}.mlp.up_proj"] = ColwiseParallel()
            plan[f"{b}.mlp.down_proj"] = RowwiseParallel(output_layouts=stream)
    if model.norm is not None:
        plan["norm"] = norm()
    if model.lm_head is not None:
        plan["lm_head"] = vocab_head(stream, loss_parallel)
    return plan


def moe_tp_plan(path: str, moe: MoE, *, sequence_parallel: bool) -> dict:
    """An MoE layer (models/moe.py) under TP, at module path `path` (issue #17).

    The router (`gate`, (E, D)) and the routed experts ((E, D, F) weights) are replicated
    over tp — every tp rank routes all of the block's tokens and runs every expert on
    them, so the load, the dropped count and the aux / z terms are each rank's own copy
    of the one-process values, counted once because the step sums them over the
    data-parallel ranks only (models/moe_terms.py; parallel/context.py `sum_reducer`).
    The shared experts, a dense SwiGLU, are sharded as the dense MLP is (gate/up
    column-parallel, down row-parallel), their partial sums all-reduced to the
    replicated (N, D) the routed output is added to.

    Sequence parallel: the layer's input is all-gathered to the whole (B, T, D) before
    the router and its output cut back to this rank's (B, T/tp, D) after (the backward:
    the output's gradient all-gathered, the input's taken as this rank's slice — exact,
    since every rank's layer saw the same tokens and the same output gradient). Routing
    each rank's T/tp slice instead would change the model: the balance loss is
    per sequence (f_e and P_e over its T tokens: not a sum over slices), and a capacity
    factor caps each expert per layer call, so the drops would depend on tp.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInputOutput,
                                                   RowwiseParallel)

    plan: dict = {f"{path}.gate": replicate_style()}
    if isinstance(moe.experts, GroupedExperts):
        plan[f"{path}.experts"] = replicated_experts()
    # else expert parallelism replaced them (parallel/expert.py, applied before TP): their
    # weights are already DTensors, sharded over ep and replicated over tp, and the
    # exchange runs on each tp index's own ep group (config/dims.py, EP × TP).
    if sequence_parallel:
        plan[path] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
            use_local_input=True, output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(1),), use_local_output=True)
    if moe.shared_experts is not None:
        s = f"{path}.shared_experts"
        plan[f"{s}.gate_proj"] = ColwiseParallel()
        plan[f"{s}.up_proj"] = ColwiseParallel()
        plan[f"{s}.down_proj"] = RowwiseParallel(output_layouts=Replicate())
    return plan
