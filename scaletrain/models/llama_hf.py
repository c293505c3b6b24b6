"""Hugging Face name and config map of the llama family (models/llama.py): transformers'
`LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `MistralForCausalLM`.

Tensor names: `model.layers.<i>.` <-> `blocks.<i>.`, `model.` dropped (embed_tokens,
norm), `lm_head` as is — the model was named for this (models/llama.py docstring).

config.json -> model.*: every field that changes what the network computes is read and
either mapped or refused, so a loaded checkpoint computes what transformers computes:
- hidden_act must be silu; Llama's mlp_bias and Llama/Qwen3's attention_bias (which put
  biases on o_proj / the MLP too) must be false; Qwen2 always has q/k/v biases and no
  other; Qwen3 always has the per-head q/k RMSNorm.
- rotary: `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`
  (older files, the Hub's Llama 3.1): type default or llama3; others are refused.
- a sliding window (Mistral; Qwen's use_sliding_window) must be off or no shorter than
  the context (max_position_embeddings): within it, windowed attention is full attention.
- seq_len is max_position_embeddings for eval / generate of the directory; a run from
  it (init.from) keeps its own model.seq_len: RoPE has no position table to fix one.
The source architecture is kept in `model.hf_architecture`, so an export writes the
family it came from (empty: derived from the flags, Qwen3 / Qwen2 / Llama).
"""

from __future__ import annotations

from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.models.hf_map import HFMap
from scaletrain.models.moe_hf import (MOE_ARCHITECTURES, MOE_MODEL_TYPES, expert_tensors,
                                      mixtral_name, moe_config, moe_fields, moe_to_ours,
                                      stacked)

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "MistralForCausalLM") + MOE_ARCHITECTURES
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral",
               **MOE_MODEL_TYPES}
QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def to_ours(name: str) -> str | None:
    if name.startswith("model.layers."):
        return moe_to_ours("blocks." + name[len("model.layers."):])
    if name.endswith("rotary_emb.inv_freq"):
        return None  # old transformers saved the RoPE buffer; it is recomputed
    return name.removeprefix("model.")


def to_hf(name: str) -> str:
    if name.startswith("blocks."):
        return "model.layers." + name[len("blocks."):]
    return name if name.startswith("lm_head.") else "model." + name


def _rope(c: dict, where: str) -> dict:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind != "llama3":
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (default or "
                              "llama3)")
    return {"rope_theta": float(theta), "rope_scaling": "llama3",
            "rope_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_seq_len": int(rope["original_max_position_embeddings"])}


def model_fields(c: dict, where: str) -> dict:
    """scaletrain model.* fields of a Llama / Qwen2 / Qwen3 / Mistral config.json."""
    arch = (c.get("architectures") or [""])[0]
    seq_len = int(c.get("max_position_embeddings", 2048))

    def refuse(key: str, why: str):
        raise CheckpointError(f"{where}: {key}={c.get(key)!r} is not supported ({why})")

    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the llama family's MLP is SwiGLU")
    if c.get("mlp_bias", False):
        refuse("mlp_bias", "no MLP biases")
    if arch != "Qwen2ForCausalLM" and c.get("attention_bias", False):
        refuse("attention_bias", "it biases o_proj too; only q/k/v biases exist here")
    window = c.get("sliding_window")
    uses_window = c.get("use_sliding_window", arch in ("MistralForCausalLM",
                                                       "MixtralForCausalLM"))
    if uses_window and window is not None and window < seq_len:
        refuse("sliding_window", f"a window shorter than max_position_embeddings={seq_len}")
    if any(t != "full_attention" for t in c.get("layer_types") or []) and uses_window:
        refuse("layer_types", "sliding-window layers")
    n_head = int(c["num_attention_heads"])
    d_model = int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or d_model // n_head)
    return {"name": "llama", "hf_architecture": arch,
            "n_layer": int(c["num_hidden_layers"]), "n_head": n_head,
            "n_kv_head": int(c.get("num_key_value_heads") or n_head),
            # 0 = d_model / n_head, so a round trip writes what it read
            "head_dim": 0 if head_dim * n_head == d_model else head_dim,
            "d_model": d_model, "d_ff": int(c["intermediate_size"]),
            "vocab_size": int(c["vocab_size"]), "seq_len": seq_len,
            "norm_eps": float(c.get("rms_norm_eps", 1e-6)), **_rope(c, where),
            "qkv_bias": arch == "Qwen2ForCausalLM", "qk_norm": arch in QK_NORM,
            "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
            # the dense classes fix moe_experts=0: a run from them stays dense
            **(moe_fields(c, arch, where) if arch in MOE_ARCHITECTURES
               else {"moe_experts": 0})}


def architecture_of(m) -> str:
    """The transformers class a llama model config is written as."""
    if m.hf_architecture:
        return m.hf_architecture
    if m.moe_experts:  # Qwen3-MoE always has the q/k norm, Mixtral never
        return "Qwen3MoeForCausalLM" if m.qk_norm else "MixtralForCausalLM"
    return ("Qwen3ForCausalLM" if m.qk_norm else "Qwen2ForCausalLM" if m.qkv_bias
            else "LlamaForCausalLM")


def config_json(m, eos_id: int | None, bos_id: int | None = None) -> dict:
    """config.json of the family the run came from (model.hf_architecture); `bos_id`:
    the tokenizer's beginning-of-text token (Llama 3's, Mistral's), None for Qwen's."""
    arch = architecture_of(m)
    if bool(m.moe_experts) != (arch in MOE_ARCHITECTURES):
        raise ConfigError(f"--format hf: model.hf_architecture={arch!r} and "
                          f"model.moe_experts={m.moe_experts} disagree (a dense class for "
                          "a dense model, Qwen3-MoE / Mixtral for experts)")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.hf_architecture={arch!r} is not one of "
                          f"{', '.join(ARCHITECTURES)}")
    needs = {"Qwen2ForCausalLM": (True, False), "Qwen3ForCausalLM": (False, True),
             "Qwen3MoeForCausalLM": (False, True)}
    bias, qk = needs.get(arch, (False, False))
    if (m.qkv_bias, m.qk_norm) != (bias, qk):
        raise ConfigError(f"--format hf: {arch} has qkv_bias={bias} and qk_norm={qk}, this "
                          f"run model.qkv_bias={m.qkv_bias}, model.qk_norm={m.qk_norm} "
                          "(set model.hf_architecture or use --format safetensors)")
    hd = m.head_dim or m.d_model // m.n_head
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": m.rope_factor,
                "low_freq_factor": m.rope_low_freq_factor,
                "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_seq_len}
    dense_ff = m.d_ff or 64 * -(-int(8 * m.d_model / 3) // 64)
    out = {"architectures": [arch], "model_type": MODEL_TYPES[arch],
           "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "intermediate_size": dense_ff,
           "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
           "num_key_value_heads": m.n_kv_head or m.n_head, "head_dim": hd,
           "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu", "tie_word_embeddings": m.tie_embeddings,
           "attention_dropout": 0.0, "initializer_range": m.init_std, "use_cache": True,
           # both spellings: transformers >= 5 reads rope_parameters, older rope_scaling
           "rope_parameters": rope, "rope_theta": m.rope_theta,
           "rope_scaling": rope if m.rope_scaling == "llama3" else None,
           "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}
    if m.moe_experts:
        out.update(moe_config(m, arch, dense_ff))
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        out["attention_bias"] = False
    if arch == "LlamaForCausalLM":
        out["mlp_bias"] = False
    if arch != "LlamaForCausalLM":
        out["sliding_window"] = None
        if arch != "MistralForCausalLM":
            out["use_sliding_window"] = False
    return out


def tensors_to_hf(m, name: str, t) -> dict:
    """One of our tensors -> its HF tensors by name: itself renamed, or an expert stack
    split per expert (models/moe_hf.py), under Mixtral's block_sparse_moe for Mixtral."""
    arch = architecture_of(m)
    pieces = expert_tensors(name, t, arch) or {name: t}
    rename = mixtral_name if arch == "MixtralForCausalLM" else (lambda n: n)
    return {rename(to_hf(n)): x for n, x in pieces.items()}


LLAMA_HF = HFMap(architectures=ARCHITECTURES,
                 model_types=tuple((t, arch) for arch, t in MODEL_TYPES.items()),
                 model_fields=model_fields, to_ours=to_ours,
                 to_hf=to_hf, config_json=config_json,
                 special_tokens=lambda eot, bos: {"eos_token": eot,
                                                 **({"bos_token": bos} if bos else {})}, stacked=stacked,
                 tensors_to_hf=tensors_to_hf)
