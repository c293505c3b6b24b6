"""A run directory's model (DESIGN.md §3): its weights saved and loaded, and a trained
run rebuilt from its directory (config, tokenizer, weights). The file names are
config/run_files.py's.

Weights written here are safetensors (never pickles): `model.safetensors` (the final
model) and `best.safetensors` (the best validation model), each with the resolved config
in the metadata so a file is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from scaletrain.checkpoint.files import save_safetensors
from scaletrain.config import Config, build_config, to_dict
from scaletrain.config.load import load_toml
from scaletrain.config.run_files import CONFIG_FILE, TOKENIZER_FILE, pick_weights
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.errors import CheckpointError
from scaletrain.finetune import prepare_loaded_model
from scaletrain.finetune.lora import adapter_only
from scaletrain.models import build_model
from scaletrain.models.contract import TiedPairs, stored_once, tie
from scaletrain.models.registry import spec_of
from scaletrain.parallel.weights import load_full_state_dict


def save_weights(model: nn.Module, path: Path, cfg: Config,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's tensors as safetensors, atomically (tied weights stored once).

    `state`: full tensors gathered beforehand from a sharded model
    (parallel/weights.py `full_state_dict`); default `model.state_dict()`. The tied
    heads are those of `cfg.model`'s family (ModelSpec.tied).
    """
    tied = spec_of(cfg.model).tied
    state = model.state_dict() if state is None else state
    state = adapter_only(state)  # a LoRA model saves only its adapters (finetune/lora.py)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()
             if not stored_once(k, tied)}
    save_safetensors(state, path, metadata={"scaletrain_config": json.dumps(to_dict(cfg))})


def load_weights(model: nn.Module, path: Path, tied: TiedPairs) -> None:
    """Load safetensors weights into `model`, refusing files that do not fit it;
    `tied`: its family's tied pairs (ModelSpec.tied), stored once and re-tied."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    expected = {k for k in adapter_only(model.state_dict()) if not stored_once(k, tied)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{path}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")

    load_full_state_dict(model, state)  # re-shards when the model is sharded (FSDP2)
    tie(model, tied)


def load_run_config(run_dir: str | Path, overrides=()) -> Config:
    """The saved config of a run, with CLI overrides on top."""
    d = Path(run_dir)
    if not (d / CONFIG_FILE).is_file():
        raise CheckpointError(f"'{d}' is not a scaletrain run directory (no {CONFIG_FILE})")
    saved = load_toml(d / CONFIG_FILE)
    return build_config(None, list(overrides), base=saved)


def load_own_tokenizer(d: Path, cfg: Config) -> Tokenizer | None:
    """The directory's tokenizer.json; None for an image model. A text model's weights
    without the tokenizer they were trained with are refused (CheckpointError, one line)
    rather than built with an empty vocabulary."""
    if (d / TOKENIZER_FILE).is_file():
        return Tokenizer.load(d / TOKENIZER_FILE)
    if spec_of(cfg.model).kind == "text":
        raise CheckpointError(f"'{d}' has no {TOKENIZER_FILE}: a text model's weights need "
                              "the tokenizer they were trained with (copy it back beside them)")
    return None


def load_model_from_run(run_dir: str | Path, overrides=(), which: str = "best",
                        device: str | torch.device = "cpu"):
    """(config, model with trained weights in eval mode, tokenizer or None) of a run."""
    d = Path(run_dir)
    cfg = load_run_config(d, overrides)
    tok = load_own_tokenizer(d, cfg)
    facts = {"vocab_size": tok.vocab_size if tok else 0, "input_shape": (1, 8, 8),
             "num_classes": 10}
    # load_weights (and a LoRA run's base, load_into) writes every tensor or refuses
    # (CheckpointError): the random init would only be overwritten
    model = build_model(cfg.model, facts, seed=cfg.train.seed, device=device, init=False)
    model = prepare_loaded_model(model, cfg)  # a LoRA run: base from init.from + adapters
    load_weights(model, pick_weights(d, which), spec_of(cfg.model).tied)
    return cfg, model.eval(), tok
