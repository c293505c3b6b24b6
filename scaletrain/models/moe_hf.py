"""The MoE part of the llama family's Hugging Face map (models/llama_hf.py):
transformers' `Qwen3MoeForCausalLM` and `MixtralForCausalLM` read into models/moe.py.

Tensors: the router is `mlp.gate.weight` (Mixtral: `block_sparse_moe.gate.weight`), the
experts one (out, in) Linear weight per expert, `mlp.experts.<j>.{gate,up,down}_proj
.weight` (Mixtral: `block_sparse_moe.experts.<j>.{w1,w3,w2}.weight`), which a load stacks
into our (E, in, out) 3-D parameters (`stacked`; finetune/hf_import.py reads, for a
dim-0 shard, only the experts this rank holds).

config.json -> model.moe_*: Qwen3-MoE's num_experts, num_experts_per_tok,
moe_intermediate_size, norm_topk_prob, decoder_sparse_step (moe_every) and
mlp_only_layers (only a prefix 0..k-1, as moe_first_dense = k); Mixtral's
num_local_experts, num_experts_per_tok, intermediate_size (its experts' width; top-k
weights always renormalised). Both route with a softmax and have no shared experts.
Writing them back (export --format hf) is not built yet and is refused.
"""

from __future__ import annotations

import re

from scaletrain.errors import CheckpointError

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
MOE_MODEL_TYPES = {"Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
_EXPERT = re.compile(r"^(blocks\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def moe_to_ours(name: str) -> str:
    """Mixtral's MoE names -> Qwen3-MoE's (ours, before stacking)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = _EXPERT.match(name)
    if m and m.group(3) in _MIXTRAL:
        name = f"{m.group(1)}.{m.group(2)}.{_MIXTRAL[m.group(3)]}.weight"
    return name


def stacked(name: str) -> tuple[str, int] | None:
    """A per-expert tensor (our name, before stacking) -> (our 3-D parameter, expert)."""
    m = _EXPERT.match(name)
    return (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else None


def moe_fields(c: dict, arch: str, where: str) -> dict:
    """model.moe_* of a Qwen3-MoE / Mixtral config.json (CheckpointError for what the
    family cannot compute exactly)."""
    top_k = int(c["num_experts_per_tok"])
    if arch == "MixtralForCausalLM":
        return {"moe_experts": int(c["num_local_experts"]), "moe_top_k": top_k,
                "moe_d_ff": int(c["intermediate_size"]), "moe_norm_topk_prob": True}
    only = list(c.get("mlp_only_layers") or [])
    if only != list(range(len(only))):
        raise CheckpointError(f"{where}: mlp_only_layers={only} is not supported (only "
                              "dense first layers 0..k-1)")
    experts = c.get("num_experts", c.get("num_local_experts"))  # v5 writes the latter
    return {"moe_experts": int(experts), "moe_top_k": top_k,
            "moe_d_ff": int(c["moe_intermediate_size"]),
            "moe_every": int(c.get("decoder_sparse_step", 1)), "moe_first_dense": len(only),
            "moe_norm_topk_prob": bool(c.get("norm_topk_prob", False))}
