"""`scaletrain export`: a consolidated model as safetensors, or as a Hugging Face GPT-2.

    scaletrain export [RUN_DIR] [--run.dir=DIR] --format safetensors|hf [--out PATH]
                      [--weights auto|final|best|checkpoint] [--max-shard-size 2GB]

Weights come from the run directory: `auto` takes the final weights (`model.safetensors`)
if the run finished, else its newest valid checkpoint (a sharded DCP checkpoint is
consolidated by loading it into a one-process model). Nothing is unpickled: weights are
safetensors, checkpoints go through the verified, allow-listed reader (safe_load.py).

`--format safetensors`: `model.safetensors` (scaletrain names, tied head stored once),
`config.toml` (the run's resolved config) and `tokenizer.json`.

`--format hf`: a directory `transformers` loads with `from_pretrained`, of the family's
own class (GPT2LMHeadModel; Llama / Qwen2 / Qwen3 / Mistral for a llama run, the one it
came from): checkpoint/hf_export.py, the family maps in models/*_hf.py. Above
`--max-shard-size` (2GB) the weights are sharded with an index, as save_pretrained does.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from scaletrain.checkpoint import manifest as mf
from scaletrain.checkpoint import run_model
from scaletrain.checkpoint.hf_export import MAX_SHARD_BYTES, export_hf, parse_size
from scaletrain.checkpoint.manager import CKPT_DIR, CheckpointManager  # + silences DCP's warning
from scaletrain.checkpoint.safe_load import (SafeFileSystemReader, SafeLoadPlanner,
                                             safe_unpickle_metadata)
from scaletrain.config import run_files
from scaletrain.config.load import dumps_toml, parse_overrides
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.finetune.lora import apply_lora, merge_lora_run
from scaletrain.models import build_model

# The chat template a chat run saved beside its tokenizer (data/chat.py
# `save_chat_files`, as transformers writes it), the file AutoTokenizer loads it from.
CHAT_TEMPLATE_FILE = "chat_template.jinja"

FORMATS = ("safetensors", "hf")
WEIGHTS = ("auto", "final", "best", "checkpoint")


def load_for_export(run_dir: Path, weights: str = "auto"):
    """(config, model in eval mode on CPU, tokenizer or None) from a run directory."""
    cfg = run_model.load_run_config(run_dir)  # CheckpointError for a foreign directory
    has_final = (run_dir / run_files.FINAL_WEIGHTS).is_file()
    if weights in ("final", "best") or (weights == "auto" and has_final):
        return run_model.load_model_from_run(run_dir, which="best" if weights == "best" else "final")
    target = CheckpointManager._newest_valid(run_dir / CKPT_DIR, required=True)
    return _checkpoint_model(cfg, run_dir, target[0], target[1])


def checkpoint_run_dir(ckpt_dir: Path) -> Path:
    """The run directory of a checkpoint RUN/checkpoints/step-N; CheckpointError for a
    checkpoint that sits anywhere else (its config and tokenizer are the run's)."""
    run_dir = ckpt_dir.resolve().parent.parent
    if ckpt_dir.resolve().parent.name != CKPT_DIR or \
            not (run_dir / run_files.CONFIG_FILE).is_file():
        raise CheckpointError(f"'{ckpt_dir}' is a checkpoint outside a run directory (no "
                              f"../../{run_files.CONFIG_FILE}): its model's config is unknown")
    return run_dir


def load_checkpoint(ckpt_dir: Path, overrides=()):
    """(config, model in eval mode on CPU, tokenizer or None, step) of one checkpoint
    RUN/checkpoints/step-N, verified against its manifest (any saved layout)."""
    run_dir = checkpoint_run_dir(ckpt_dir)
    manifest = mf.verify(ckpt_dir)  # CheckpointError naming a missing or corrupt file
    cfg = run_model.load_run_config(run_dir, overrides)
    return (*_checkpoint_model(cfg, run_dir, ckpt_dir, manifest), manifest["step"])


def _checkpoint_model(cfg, run_dir: Path, path: Path, manifest: dict):
    """(config, model, tokenizer or None): the run's model built from `cfg` and its
    tokenizer, the tensors of the verified checkpoint `path`."""
    tok = run_model.load_own_tokenizer(run_dir, cfg)
    facts = {"vocab_size": tok.vocab_size if tok else 0, "input_shape": (1, 8, 8),
             "num_classes": 10}
    model = build_model(cfg.model, facts, seed=cfg.train.seed)
    f = cfg.finetune
    if f.lora_rank:  # its checkpoint holds the LoRA layers' names, base weights included
        apply_lora(model, f.lora_rank, f.lora_alpha, f.lora_targets)
    load_model_from_checkpoint(model, path, manifest)
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


def export_safetensors(cfg, model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run_model.save_weights(model, out / run_files.FINAL_WEIGHTS, cfg)
    run_files.write_atomic(out / run_files.CONFIG_FILE, dumps_toml(cfg))
    if tok is not None:
        tok.save(out / run_files.TOKENIZER_FILE)


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None,
           weights: str = "auto", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
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
    if fmt == "hf":
        export_hf(cfg, model, tok, tmp, max_shard_bytes)
        if (run_dir / CHAT_TEMPLATE_FILE).is_file():  # a chat run: AutoTokenizer reads it
            shutil.copyfile(run_dir / CHAT_TEMPLATE_FILE, tmp / CHAT_TEMPLATE_FILE)
    else:
        export_safetensors(cfg, model, tok, tmp)
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
    p.add_argument("--max-shard-size", default="2GB",
                   help="--format hf: largest weights file before sharding (e.g. 500MB)")
    args = p.parse_args(rest)
    max_shard_bytes = parse_size(args.max_shard_size)
    run_dir = args.run_dir or dict(overrides).get("run.dir")
    if not run_dir:
        raise ConfigError("export needs a run directory (RUN_DIR or --run.dir=DIR)")
    unknown = [k for k, _ in overrides if k != "run.dir"]
    if unknown:
        raise ConfigError(f"export takes no config overrides (got --{unknown[0]})")
    path = export(run_dir, args.format, args.out, args.weights, max_shard_bytes)
    print(f"exported {args.format} -> {path}")
    return 0
