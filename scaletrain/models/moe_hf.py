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

Writing them back (export --format hf; `moe_config` and `expert_tensors`): the same
per-expert tensors transformers' own save_pretrained writes (it unfuses its in-memory
gate_up_proj on save), so the Hub's loaders read them. A run whose MoE the two classes
cannot compute is refused with one line: shared experts, the sigmoid_bias router (its
bias is not in either class), a capacity factor (transformers never drops a token), for
Mixtral dense blocks or unnormalised top-k weights.
"""

from __future__ import annotations

import re

import torch

from scaletrain.errors import CheckpointError, ConfigError

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
MOE_MODEL_TYPES = {"Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
_EXPERT = re.compile(r"^(blocks\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TO_MIXTRAL = {v: k for k, v in _MIXTRAL.items()}
_STACK = re.compile(r"^(blocks\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


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


def moe_config(m, arch: str, dense_ff: int) -> dict:
    """The MoE fields of a Qwen3-MoE / Mixtral config.json for the run's model config
    `m` (ConfigError, one line, for an MoE neither class computes)."""
    def refuse(what: str):
        raise ConfigError(f"--format hf: {arch} has no {what} (use --format safetensors)")

    if m.moe_shared_experts:
        refuse(f"shared experts (model.moe_shared_experts={m.moe_shared_experts})")
    if m.moe_router != "softmax":
        refuse(f"model.moe_router={m.moe_router!r} (it routes with a softmax)")
    if m.moe_capacity_factor:
        refuse(f"capacity factor (model.moe_capacity_factor={m.moe_capacity_factor}: it "
               "never drops a token)")
    expert_ff = m.moe_d_ff or dense_ff
    common = {"num_experts_per_tok": m.moe_top_k, "router_aux_loss_coef": m.moe_aux_loss,
              "output_router_logits": False}
    if arch == "MixtralForCausalLM":
        if m.moe_every != 1 or m.moe_first_dense:
            refuse(f"dense blocks (model.moe_every={m.moe_every}, "
                   f"model.moe_first_dense={m.moe_first_dense})")
        if not m.moe_norm_topk_prob:
            refuse("unnormalised top-k weights (model.moe_norm_topk_prob=false)")
        return {**common, "num_local_experts": m.moe_experts, "intermediate_size": expert_ff,
                "router_jitter_noise": 0.0}
    return {**common, "num_experts": m.moe_experts, "moe_intermediate_size": expert_ff,
            "intermediate_size": dense_ff, "norm_topk_prob": m.moe_norm_topk_prob,
            "decoder_sparse_step": m.moe_every,
            "mlp_only_layers": list(range(m.moe_first_dense))}


def expert_tensors(name: str, t: torch.Tensor, arch: str) -> dict[str, torch.Tensor] | None:
    """Our 3-D expert parameter (E, in, out) -> its per-expert (out, in) Linear weights
    under our per-expert names (Mixtral's w1/w3/w2), or None for any other tensor; the
    caller adds the `model.layers.` prefix (and Mixtral's block_sparse_moe) as for the
    rest."""
    m = _STACK.match(name)
    if not m:
        return None
    proj = _TO_MIXTRAL[m.group(2)] if arch == "MixtralForCausalLM" else m.group(2)
    return {f"{m.group(1)}.{j}.{proj}.weight": t[j].t().contiguous()
            for j in range(t.shape[0])}


def mixtral_name(name: str) -> str:
    """Our (HF-prefixed) MoE block name -> Mixtral's: the MoE feed-forward is
    `block_sparse_moe` (every Mixtral block is an MoE block)."""
    return name.replace(".mlp.", ".block_sparse_moe.")
