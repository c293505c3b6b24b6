"""`scaletrain export`: a consolidated model as safetensors, or as a Hugging Face GPT-2.

    scaletrain export [RUN_DIR] [--run.dir=DIR] --format safetensors|hf [--out PATH]
                      [--weights auto|final|best|checkpoint]

Weights come from the run directory: `auto` takes the final weights (`model.safetensors`)
if the run finished, else its newest valid checkpoint (a sharded DCP checkpoint is
consolidated by loading it into a one-process model). Nothing is unpickled: weights are
safetensors, checkpoints go through the verified, allow-listed reader (safe_load.py).

`--format safetensors`: `model.safetensors` (scaletrain names, tied head stored once),
`config.toml` (the run's resolved config) and `tokenizer.json`.

`--format hf` (GPT only): a directory `transformers` loads with
`GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained`:
- `config.json` with GPT-2's field names (n_embd, n_layer, n_head, n_positions, ...);
  scaletrain's GPT computes GPT-2 exactly: tanh GELU ("gelu_new"), LayerNorm eps 1e-5,
  attention scaled by 1/sqrt(head dim), tied output head.
- `model.safetensors` under GPT-2's names: `transformer.{wte,wpe,ln_f}`,
  `transformer.h.<i>.*` for `blocks.<i>.*`; the attention and MLP projections are
  `Conv1D` in transformers (`pytorch_utils.Conv1D`: y = x @ W + b, W of shape (in, out)),
  so their weights are the transpose of `nn.Linear`'s (out, in). The head is tied and,
  as in `save_pretrained`, not stored.
- `tokenizer.json` (the run's byte-level BPE), `tokenizer_config.json`,
  `special_tokens_map.json`: `<|endoftext|>` is bos, eos and unk, as in GPT-2.
  `split_special_tokens: true`: text is text. A literal "<|endoftext|>" in a prompt or
  document is ordinary text (a few BPE tokens), never the end-of-text id,
  in scaletrain (data/tokenizer.py sets `encode_special_tokens`) and in transformers
  alike, so a user's text cannot forge a document boundary; the id is only ever added
  on purpose (prepare appends it after each document; `eos_token_id` stops generation).
The reverse mapping is finetune/hf_import.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from scaletrain.checkpoint import run_model
from scaletrain.checkpoint.files import save_safetensors
from scaletrain.checkpoint.manager import CKPT_DIR, CheckpointManager  # + silences DCP's warning
from scaletrain.checkpoint.safe_load import (SafeFileSystemReader, SafeLoadPlanner,
                                             safe_unpickle_metadata)
from scaletrain.config import run_files
from scaletrain.config.load import dumps_toml, parse_overrides
from scaletrain.data.tokenizer import EOT, Tokenizer
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.finetune.lora import merge_lora_run
from scaletrain.models import build_model

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
FORMATS = ("safetensors", "hf")
WEIGHTS = ("auto", "final", "best", "checkpoint")


def load_for_export(run_dir: Path, weights: str = "auto"):
    """(config, model in eval mode on CPU, tokenizer or None) from a run directory."""
    cfg = run_model.load_run_config(run_dir)  # CheckpointError for a foreign directory
    has_final = (run_dir / run_files.FINAL_WEIGHTS).is_file()
    if weights in ("final", "best") or (weights == "auto" and has_final):
        return run_model.load_model_from_run(run_dir, which="best" if weights == "best" else "final")
    tok_path = run_dir / run_files.TOKENIZER_FILE
    tok = Tokenizer.load(tok_path) if tok_path.is_file() else None
    facts = {"vocab_size": tok.vocab_size if tok else 0, "input_shape": (1, 8, 8),
             "num_classes": 10}
    model = build_model(cfg.model, facts, seed=cfg.train.seed)
    target = CheckpointManager._newest_valid(run_dir / CKPT_DIR, required=True)
    load_model_from_checkpoint(model, target[0], target[1])
    return cfg, model.eval(), tok


def load_model_from_checkpoint(model: torch.nn.Module, path: Path, manifest: dict) -> None:
    """Load only the model's tensors of a verified DCP checkpoint (any saved layout)."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         set_model_state_dict)

    try:
        safe_unpickle_metadata((path / ".metadata").read_bytes())
    except (pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be loaded safely ({e})") from None
    state = {"app": {"model": get_model_state_dict(model)}}
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    set_model_state_dict(model, state["app"]["model"])


def hf_config(cfg, model, tok) -> dict:
    """GPT-2 `config.json` for scaletrain's GPT (field names of transformers' GPT2Config)."""
    c = model.config
    eot = tok.eot_id if tok is not None else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.seq_len, "n_embd": c.d_model,
        "n_layer": c.n_layer, "n_head": c.n_head,
        "n_inner": c.d_ff or None,  # None means 4 * n_embd, as d_ff = 0 does here
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "initializer_range": c.init_std, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """scaletrain GPT tensors under GPT-2's names, Conv1D weights transposed, fp32."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("lm_head."):
            continue  # tied to wte; transformers re-ties it on load
        t = t.detach().to("cpu", torch.float32)
        if name.endswith(CONV1D):
            t = t.t()  # Linear (out, in) -> Conv1D (in, out)
        if name.startswith("blocks."):
            name = "h." + name[len("blocks."):]
        out["transformer." + name] = t.contiguous()
    return out


def export_hf(cfg, model, tok, out: Path) -> None:
    if cfg.model.name != "gpt":
        raise ConfigError(f"--format hf exports a GPT; this run's model.name is "
                          f"'{cfg.model.name}' (use --format safetensors)")
    if not cfg.model.bias:
        raise ConfigError("--format hf: this run has model.bias=false, but GPT-2 always "
                          "has biases (use --format safetensors)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, model, tok), indent=2))
    save_safetensors(hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    if tok is not None:
        tok.save(out / "tokenizer.json")
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.seq_len,
             "add_prefix_space": False, "clean_up_tokenization_spaces": False,
             # Encode a literal "<|endoftext|>" as text, as scaletrain's Tokenizer does
             # (the module docstring says why); transformers' default would parse it.
             "split_special_tokens": True, **special},
            indent=2))


def export_safetensors(cfg, model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run_model.save_weights(model, out / run_files.FINAL_WEIGHTS, cfg)
    run_files.write_atomic(out / run_files.CONFIG_FILE, dumps_toml(cfg))
    if tok is not None:
        tok.save(out / run_files.TOKENIZER_FILE)


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None,
           weights: str = "auto") -> Path:
    """Write the run's model in `fmt` to `out` (default RUN_DIR/export-FMT); the path."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out) if out else run_dir / f"export-{fmt}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' exists and is not a directory")
    cfg, model, tok = load_for_export(run_dir, weights)

    model = merge_lora_run(cfg, model)  # a LoRA run exports W + (alpha/r) B A
    tmp = out.with_name(out.name + ".tmp")  # complete or absent, like checkpoints
    shutil.rmtree(tmp, ignore_errors=True)
    (export_hf if fmt == "hf" else export_safetensors)(cfg, model, tok, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str]) -> int:
    """`scaletrain export` (see the module docstring)."""
    overrides, rest = parse_overrides(argv)
    p = argparse.ArgumentParser(prog="scaletrain export")
    p.add_argument("run_dir", nargs="?", help="run directory (default: --run.dir)")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument("--out", help="output directory (default: RUN_DIR/export-FORMAT)")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="auto: final weights if the run finished, else newest checkpoint")
    args = p.parse_args(rest)
    run_dir = args.run_dir or dict(overrides).get("run.dir")
    if not run_dir:
        raise ConfigError("export needs a run directory (RUN_DIR or --run.dir=DIR)")
    unknown = [k for k, _ in overrides if k != "run.dir"]
    if unknown:
        raise ConfigError(f"export takes no config overrides (got --{unknown[0]})")
    path = export(run_dir, args.format, args.out, args.weights)
    print(f"exported {args.format} -> {path}")
    return 0
