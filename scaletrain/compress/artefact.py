"""Artefact directories: what `compress` writes and what `generate`, `eval`, `serve`
and `init.from` / `distill.teacher` read.

An artefact directory holds `config.toml` (the resolved config of the source run),
`tokenizer.json`, `model.safetensors` and `artefact.json`:
`{"format": "scaletrain-artefact", "kind": "dense" | "structured" | "dynamic-int8" |
"weight-int8" | "weight-int4", ...}` (+ "heads", "d_ff" for structured). A dense
artefact is laid out exactly like a run directory, so anything that reads a run reads it.

`load_artefact(path)` accepts any of: a run directory, an artefact directory, or a
Hugging Face GPT-2 directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from scaletrain.checkpoint.export import load_checkpoint
from scaletrain.checkpoint.files import save_safetensors
from scaletrain.checkpoint.manifest import MANIFEST
from scaletrain.checkpoint.run_model import (load_model_from_run, load_own_tokenizer,
                                             load_run_config)
from scaletrain.compress.prune import shrink_to
from scaletrain.compress.quantize import load_quantized
from scaletrain.config import build_config, dumps_toml
from scaletrain.config.run_files import CONFIG_FILE, TOKENIZER_FILE, write_atomic
from scaletrain.data.tokenizer import SpecialTokensError, Tokenizer
from scaletrain.errors import CheckpointError, UserError
from scaletrain.finetune import hf_import
from scaletrain.finetune.init_from import load_into
from scaletrain.models import build_model
from scaletrain.models.contract import TiedPairs, stored_once
from scaletrain.models.registry import spec_of

ARTEFACT_FILE = "artefact.json"
FORMAT = "scaletrain-artefact"
WEIGHTS = "model.safetensors"
KINDS = ("dense", "structured", "dynamic-int8", "weight-int8", "weight-int4")


def save_artefact(out: Path, state: dict[str, torch.Tensor], cfg, tokenizer, kind: str,
                  **meta) -> Path:
    """Write an artefact directory (weights atomically, artefact.json last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ARTEFACT_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
    write_atomic(out / CONFIG_FILE, dumps_toml(cfg))
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_FILE)
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()},
                     out / WEIGHTS, metadata={"artefact_kind": kind})
    write_atomic(out / ARTEFACT_FILE, json.dumps({"format": FORMAT, "kind": kind, **meta},
                                                 indent=1))
    return out


def dense_state(model: nn.Module, tied: TiedPairs) -> dict[str, torch.Tensor]:
    """Tensors of a plain model as a run directory stores them (tied heads once;
    `tied`: the family's pairs, ModelSpec.tied)."""
    return {k: v for k, v in model.state_dict().items() if not stored_once(k, tied)}


def read_meta(path: Path) -> dict | None:
    f = Path(path) / ARTEFACT_FILE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise CheckpointError(f"{f}: not a scaletrain artefact description")
    return meta


def load_artefact(path: str | os.PathLike, overrides=(), which: str = "best",
                  device: str | torch.device = "cpu"):
    """(config, model in eval mode, tokenizer or None) of any weights directory."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"'{d}' is not a directory")
    if (d / MANIFEST).is_file():  # RUN/checkpoints/step-N: the run's model, its tensors
        cfg, model, tok, _ = load_checkpoint(d, overrides)
        return cfg, model.to(device), tok
    meta = read_meta(d)
    if meta is None:
        if hf_import.is_hf_dir(d) and not (d / "config.toml").is_file():
            return _load_hf(d, overrides, device)
        return load_model_from_run(d, overrides, which=which, device=device)
    cfg = load_run_config(d, overrides)
    tok = load_own_tokenizer(d, cfg)
    kind = meta["kind"]
    # Dense and structured weights go through load_into, which writes every tensor or
    # refuses: the random init would only be overwritten. A quantized artefact's loader
    # (load_quantized) reads what it holds and keeps the rest, so it keeps the init.
    model = build_model(cfg.model, {"vocab_size": tok.vocab_size if tok else 0},
                        seed=cfg.train.seed, device="cpu",
                        init=kind not in ("dense", "structured"))
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{d / WEIGHTS}: not a readable safetensors file ({e})") from None
    if kind == "structured":
        shrink_to(model, meta["heads"], meta["d_ff"], spec_of(cfg.model).prune_units)
    if kind in ("dense", "structured"):
        load_into(model, state, str(d / WEIGHTS), spec_of(cfg.model).tied)
        model.to(device)
    else:
        if str(device) != "cpu" and kind == "dynamic-int8":
            raise CheckpointError(f"'{d}': dynamic-int8 artefacts run on the CPU only")
        load_quantized(model, state, kind)
        model.to(device)
    return cfg, model.eval(), tok


def _load_hf(d: Path, overrides, device):
    """A Hugging Face directory (any family with an HF map): model fields from
    config.json, default settings, weights read shard by shard."""
    fields = hf_import.check_hf_dir(d)
    cfg = build_config(None, [(f"model.{k}", str(v).lower() if isinstance(v, bool) else str(v))
                              for k, v in fields.items()] + list(overrides))
    # load_hf_into writes every parameter or refuses (CheckpointError): no random init
    model = build_model(cfg.model, {}, seed=0, device="cpu", init=False)
    hf_import.load_hf_into(model, d, spec_of(cfg.model).tied)
    tok = None
    if (d / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.load(d / "tokenizer.json")
        except SpecialTokensError:  # a contradicting tokenizer_config.json: the user's
            raise
        except (ValueError, UserError):  # no <|endoftext|>: logits only, no text
            tok = None
    return cfg, model.to(device).eval(), tok
