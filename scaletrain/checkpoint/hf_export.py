"""`scaletrain export --format hf`: a run's model as a Hugging Face `save_pretrained`
directory of the family's own transformers class (`ModelSpec.hf`, models/hf_map.py:
GPT2LMHeadModel; LlamaForCausalLM / Qwen2 / Qwen3 / Mistral / Qwen3-MoE / Mixtral, as
`model.hf_architecture` says), which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
load.

- `config.json`: the family map's (models/gpt_hf.py, models/llama_hf.py), and
  `generation_config.json` with its bos / eos ids, as `save_pretrained` writes: the
  run's tokenizer's, so `generate` in transformers stops where scaletrain's does.
- weights: fp32 safetensors under HF names (tied heads not stored, as save_pretrained
  does); one `model.safetensors` up to `max_shard_bytes` (default 2 GB; `--max-shard-size`),
  above it `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`.
- `tokenizer.json` (the run's), `tokenizer_config.json`, `special_tokens_map.json`:
  the run's end-of-text token as the family names it. `split_special_tokens: true`:
  text is text. A literal "<|endoftext|>" in a prompt or document is ordinary text (a
  few BPE tokens), never the end-of-text id, in scaletrain (data/tokenizer.py sets
  `encode_special_tokens`) and in transformers alike, so a user's text cannot forge a
  document boundary; the id is only ever added on purpose.
The reverse is finetune/hf_import.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from scaletrain.checkpoint.files import save_safetensors
from scaletrain.errors import ConfigError
from scaletrain.models.contract import stored_once
from scaletrain.models.registry import spec_of

MAX_SHARD_BYTES = 2 * 1000**3
UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_size(text: str) -> int:
    """'2GB', '500MB', '100000' -> bytes; ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?B?)\s*", text.upper())
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size must be a positive size like 2GB or 500MB, "
                          f"got {text!r}")
    return int(m.group(1)) * UNITS[m.group(2)]


def hf_tensors(model, spec, mcfg) -> dict[str, torch.Tensor]:
    """The model's tensors under the family's HF names, fp32, in HF orientation (`mcfg`:
    the run's model config, for a family whose names depend on it)."""
    out = {}
    for name, t in model.state_dict().items():
        if stored_once(name, spec.tied):
            continue  # tied to its embedding; transformers re-ties it on load
        t = t.detach().to("cpu", torch.float32)
        if spec.hf.transposed and name.endswith(spec.hf.transposed):
            t = t.t()  # Linear (out, in) -> Conv1D (in, out)
        t = t.contiguous()
        if spec.hf.tensors_to_hf is not None:
            out.update(spec.hf.tensors_to_hf(mcfg, name, t))
        else:
            out[spec.hf.to_hf(name)] = t
    return out


def write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or shards of at most max_shard_bytes (a bigger tensor
    alone in its shard) plus the index transformers reads."""
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_safetensors(tensors, out / "model.safetensors", metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, out / file, metadata=meta)
        weight_map.update({name: file for name in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def export_hf(cfg, model, tok, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    spec = spec_of(cfg.model)
    if spec.hf is None:
        raise ConfigError(f"--format hf: model.name='{cfg.model.name}' has no Hugging Face "
                          "format (use --format safetensors)")
    # model.vocab_size 0 meant "the tokenizer's": the built model knows the number
    mcfg = dataclasses.replace(cfg.model, vocab_size=model.config.vocab_size)
    config = spec.hf.config_json(mcfg, tok.eot_id if tok is not None else None,
                                 tok.bos_id if tok is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
        indent=2))
    write_shards(hf_tensors(model, spec, mcfg), out, max_shard_bytes)
    if tok is not None:
        tok.save(out / "tokenizer.json")
        special = spec.hf.special_tokens(tok.eot_token, tok.bos_token)
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.seq_len,
             "add_prefix_space": False, "clean_up_tokenization_spaces": False,
             # Encode a literal "<|endoftext|>" as text, as scaletrain's Tokenizer does
             # (the module docstring says why); transformers' default would parse it.
             "split_special_tokens": True, **special},
            indent=2))
