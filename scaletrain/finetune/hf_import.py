"""Read a Hugging Face GPT-2 directory (`save_pretrained` of `GPT2LMHeadModel`) into
scaletrain's GPT: the reverse of the export mapping (checkpoint/export.py, issue #4).

Names: `transformer.wte/wpe/ln_f.*` -> `wte/wpe/ln_f.*`, `transformer.h.<i>.*` ->
`blocks.<i>.*` (same sub-names), `lm_head` tied to `wte`. HF's GPT-2 linear layers are
`Conv1D` modules that store the weight as (in, out) — `transformers`
`pytorch_utils.Conv1D` computes x @ W + b — so every `attn.c_attn`, `attn.c_proj`,
`mlp.c_fc`, `mlp.c_proj` weight is transposed into `nn.Linear`'s (out, in).

Only `config.json` and `model.safetensors` are read (no pickles, no `transformers`
import): the file format is the library's, the code path is plain safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scaletrain.errors import CheckpointError

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved with the attention (causal mask, -1e4 fill).
IGNORED = (".attn.bias", ".attn.masked_bias")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # what models/gpt.py computes


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def hf_model_fields(path: Path) -> dict:
    """scaletrain `model.*` fields of a HF GPT-2 `config.json`; CheckpointError when the
    checkpoint is not a GPT-2 this GPT computes exactly."""
    f = path / "config.json"
    try:
        c = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable JSON config ({e})") from None
    if c.get("model_type") != "gpt2":
        raise CheckpointError(f"{f}: model_type {c.get('model_type')!r} is not 'gpt2'")
    checks = [("activation_function", c.get("activation_function", "gelu_new") in GELU_TANH),
              ("layer_norm_epsilon", abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12),
              ("scale_attn_weights", c.get("scale_attn_weights", True)),
              ("scale_attn_by_inverse_layer_idx",
               not c.get("scale_attn_by_inverse_layer_idx", False)),
              ("tie_word_embeddings", c.get("tie_word_embeddings", True)),
              ("add_cross_attention", not c.get("add_cross_attention", False))]
    for key, ok in checks:
        if not ok:
            raise CheckpointError(f"{f}: {key}={c.get(key)!r} is not supported (scaletrain's "
                                  "GPT is GPT-2 with tanh GELU, LayerNorm eps 1e-5, tied head)")
    return {"name": "gpt", "n_layer": c["n_layer"], "n_head": c["n_head"],
            "d_model": c["n_embd"], "d_ff": c.get("n_inner") or 0,
            "seq_len": c["n_positions"], "vocab_size": c["vocab_size"], "bias": True}


def hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a HF GPT-2 directory under scaletrain names (float32, (out, in))."""
    f = path / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"'{path}': no model.safetensors (save_pretrained with "
                              "safe_serialization, the default)")
    try:
        hf = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        name = key.removeprefix("transformer.")
        if name.startswith("h."):
            name = "blocks." + name[2:]
        if name.endswith(IGNORED) or name == "lm_head.weight":
            continue  # masks are recomputed; the head is the (tied) embedding
        if name.endswith(CONV1D):
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        out[name] = t.float().contiguous()
    if "lm_head.weight" in hf and "wte.weight" in out \
            and not torch.equal(hf["lm_head.weight"].float(), out["wte.weight"]):
        raise CheckpointError(f"{f}: lm_head differs from wte; only tied heads are supported")
    return out
