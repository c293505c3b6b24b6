"""Hugging Face name and config map of the GPT family (models/gpt.py): transformers'
`GPT2LMHeadModel` (issue #4's export and its reverse).

Names: `transformer.wte/wpe/ln_f.*` <-> `wte/wpe/ln_f.*`, `transformer.h.<i>.*` <->
`blocks.<i>.*` (same sub-names), `lm_head` tied to `wte` (not stored, as in
`save_pretrained`). HF's GPT-2 linear layers are `Conv1D` modules storing the weight as
(in, out) — `transformers.pytorch_utils.Conv1D` computes x @ W + b — so every
`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` weight is the transpose of
`nn.Linear`'s (out, in).

config.json: scaletrain's GPT computes GPT-2 exactly — tanh GELU ("gelu_new"), LayerNorm
eps 1e-5, attention scaled by 1/sqrt(head dim), tied output head, biases; a config that
differs is refused on the way in, a run that differs (model.bias=false) on the way out.
The tokenizer files say `<|endoftext|>` is bos, eos and unk, as in GPT-2.
"""

from __future__ import annotations

from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.models.hf_map import HFMap

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved with the attention (causal mask, -1e4 fill).
IGNORED = (".attn.bias", ".attn.masked_bias")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # what models/gpt.py computes


def model_fields(c: dict, where: str) -> dict:
    """scaletrain `model.*` fields of a HF GPT-2 config.json; CheckpointError when the
    checkpoint is not a GPT-2 this GPT computes exactly."""
    checks = [("activation_function", c.get("activation_function", "gelu_new") in GELU_TANH),
              ("layer_norm_epsilon", abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12),
              ("scale_attn_weights", c.get("scale_attn_weights", True)),
              ("scale_attn_by_inverse_layer_idx",
               not c.get("scale_attn_by_inverse_layer_idx", False)),
              ("tie_word_embeddings", c.get("tie_word_embeddings", True)),
              ("add_cross_attention", not c.get("add_cross_attention", False))]
    for key, ok in checks:
        if not ok:
            raise CheckpointError(f"{where}: {key}={c.get(key)!r} is not supported (scaletrain's "
                                  "GPT is GPT-2 with tanh GELU, LayerNorm eps 1e-5, tied head)")
    return {"name": "gpt", "n_layer": c["n_layer"], "n_head": c["n_head"],
            "d_model": c["n_embd"], "d_ff": c.get("n_inner") or 0,
            "seq_len": c["n_positions"], "vocab_size": c["vocab_size"], "bias": True}


def to_ours(name: str) -> str | None:
    name = name.removeprefix("transformer.")
    if name.startswith("h."):
        name = "blocks." + name[2:]
    return None if name.endswith(IGNORED) else name  # masks are recomputed


def to_hf(name: str) -> str:
    if name.startswith("lm_head."):
        return name
    if name.startswith("blocks."):
        name = "h." + name[len("blocks."):]
    return "transformer." + name


def config_json(m, eos_id: int | None, bos_id: int | None = None) -> dict:
    """GPT-2 config.json (the field names of transformers' GPT2Config). GPT-2 begins
    text with its end-of-text token: `bos_id` is not used."""
    if not m.bias:
        raise ConfigError("--format hf: this run has model.bias=false, but GPT-2 always "
                          "has biases (use --format safetensors)")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_positions": m.seq_len, "n_embd": m.d_model,
        "n_layer": m.n_layer, "n_head": m.n_head,
        "n_inner": m.d_ff or None,  # None means 4 * n_embd, as d_ff = 0 does here
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "initializer_range": m.init_std, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
    }


GPT_HF = HFMap(architectures=("GPT2LMHeadModel",), model_types=(("gpt2", "GPT2LMHeadModel"),),
               model_fields=model_fields,
               to_ours=to_ours, to_hf=to_hf, config_json=config_json,
               special_tokens=lambda eot, bos: {"bos_token": eot, "eos_token": eot,
                                           "unk_token": eot},
               transposed=CONV1D)
