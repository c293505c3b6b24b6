"""`init.from`: a run directory, a compress artefact / export directory, or a Hugging
Face `save_pretrained` directory of a family with an HF map (GPT-2; Llama, Qwen2, Qwen3,
Mistral: finetune/hf_import.py), as the starting point of a new training run.

What comes from the source: the model architecture (the family's `source_fields`,
models/registry.py) and the tokenizer (so the new data is encoded with the ids the
weights were trained on). What comes from the new config: data, optimizer, schedule,
steps, dropout, and a llama's seq_len (its weights do not fix one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from scaletrain.config.load import load_toml, validate
from scaletrain.config.run_files import CONFIG_FILE, TOKENIZER_FILE, pick_weights
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.finetune import hf_import
from scaletrain.finetune.lora import (adapter_only, apply_lora, freeze, init_adapters,
                                      merge_adapter_state)
from scaletrain.models.contract import TiedPairs, tie
from scaletrain.models.registry import spec_for, spec_of
from scaletrain.parallel.weights import load_full_state_dict

ARTEFACT_FILE = "artefact.json"


@dataclass
class Source:
    kind: str  # "run" | "artefact" | "hf" | "safetensors"
    dir: Path
    model: dict  # model.* fields
    tokenizer: Path | None
    weights: Path | None  # None for "hf" (read through hf_import, shard by shard)


def _read_toml_model(path: Path) -> dict:
    return load_toml(path).get("model", {})


def find_source(path: str | os.PathLike, which: str = "best", what: str = "init.from") -> Source:
    """Identify what kind of weights directory `path` is; CheckpointError if none."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{what}: '{d}' is not a directory")
    tok = d / TOKENIZER_FILE if (d / TOKENIZER_FILE).is_file() else None
    if (d / ARTEFACT_FILE).is_file():
        meta = json.loads((d / ARTEFACT_FILE).read_text())
        if meta.get("kind") != "dense":
            raise CheckpointError(f"{what}: '{d}' is a {meta.get('kind')} artefact; only "
                                  "dense weights can be trained (use its run directory)")
        return Source("artefact", d, _read_toml_model(d / CONFIG_FILE), tok,
                      d / "model.safetensors")
    if (d / CONFIG_FILE).is_file():
        return Source("run", d, _read_toml_model(d / CONFIG_FILE), tok, pick_weights(d, which))
    if hf_import.is_hf_dir(d):  # architecture, shards and shapes checked from headers
        return Source("hf", d, hf_import.check_hf_dir(d), tok, None)
    w = d / "model.safetensors"
    if w.is_file():  # a bare export: the resolved config is in the file's metadata
        try:
            with safe_open(str(w), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{w}: not a readable safetensors file ({e})") from None
        if "scaletrain_config" in meta:
            return Source("safetensors", d, json.loads(meta["scaletrain_config"])["model"],
                          tok, w)
    raise CheckpointError(f"{what}: '{d}' holds no weights scaletrain can read (a run "
                          "directory, an artefact, or a Hugging Face directory)")


def source_state(src: Source) -> dict[str, torch.Tensor]:
    """The source's full weights under scaletrain names."""
    if src.kind == "hf":
        return hf_import.hf_state_dict(src.dir)
    try:
        state = load_file(str(src.weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{src.weights}: not a readable safetensors file ({e})") from None
    if src.kind == "run" and state and adapter_only(state) is not state:
        return _lora_run_state(src, state)  # a LoRA run saved only its adapters
    return state


def lora_base(src: Source) -> tuple[Source, dict]:
    """(the base source, the saved `finetune` section) of a LoRA run `src`, whose weights
    are its adapters only; CheckpointError when that base directory is gone."""
    saved = load_toml(src.dir / CONFIG_FILE)
    base_from = saved.get("init", {}).get("from", "")
    if not base_from or not Path(base_from).is_dir():
        raise CheckpointError(f"init.from: '{src.dir}' is a LoRA run (its weights are the "
                              f"adapters only) whose base init.from '{base_from}' is gone")
    return (find_source(base_from, saved.get("init", {}).get("weights", "best")),
            saved.get("finetune", {}))


def _lora_run_state(src: Source, adapters: dict) -> dict[str, torch.Tensor]:
    """A LoRA run's merged weights (its own init.from + the adapters), so a LoRA run can
    be the init.from of the next stage (chat SFT with LoRA -> DPO) as a dense model."""
    base, lora = lora_base(src)
    base_from = str(base.dir)
    try:
        return merge_adapter_state(source_state(base), adapters, lora["lora_rank"],
                                   lora["lora_alpha"])
    except KeyError as e:
        raise CheckpointError(f"init.from: '{src.dir}': its adapters do not fit its base "
                              f"'{base_from}' (no {e})") from None


def resolve_init(cfg, user_set: Collection[str] = (), resuming: bool = False):
    """Fill `cfg.model` (shape fields) and `cfg.data.tokenizer` from `init.from`, in place.

    A no-op without `init.from`. `user_set`: the `section.key`s the user set (config/
    load.py `user_keys`); a shape field among them that differs from the source's is
    refused, naming it, even when it equals the default: the weights fix the shape, and
    dropping the override without a word trained another model than asked. The trainer
    passes none: the command line checked them before anything was launched (cli/train.py).

    `resuming` (train/run_guard.py `resumes_in_place`): the shape is the run's own saved
    config.toml's and a checkpoint replaces every weight, so init.from is not read; it
    may have been moved or deleted since. A tokenizer that came from init.from is then
    read from the run's own copy (the same token ids).
    (LoRA / freezing with several processes: parallel/world_checks.py.)
    """
    f = cfg.finetune
    if f.lora_rank and not cfg.init.from_:
        raise ConfigError("finetune.lora_rank needs init.from (the frozen base weights)")
    if cfg.distill.teacher and not cfg.init.from_ and not cfg.data.tokenizer:
        teacher = find_source(cfg.distill.teacher, what="distill.teacher")
        if teacher.tokenizer is not None:  # the student must speak the teacher's ids
            cfg.data.tokenizer = str(teacher.tokenizer.resolve())
    if not cfg.init.from_:
        return cfg
    if resuming:
        run = Path(cfg.run.dir)
        shape, origin = _read_toml_model(run / CONFIG_FILE), f"the resumed run.dir '{run}'"
        from_source = str((Path(cfg.init.from_) / TOKENIZER_FILE).resolve())
        if cfg.data.tokenizer == from_source and (run / TOKENIZER_FILE).is_file():
            cfg.data.tokenizer = str((run / TOKENIZER_FILE).resolve())
    else:
        src = find_source(cfg.init.from_, cfg.init.weights)
        shape, origin = src.model, f"init.from='{cfg.init.from_}'"
        if src.tokenizer is not None and not cfg.data.tokenizer:
            cfg.data.tokenizer = str(src.tokenizer.resolve())
    spec = spec_for(shape.get("name", "gpt"))
    fixed = spec.source_fields
    asked = {k: getattr(cfg.model, k) for k in fixed if f"model.{k}" in user_set}
    for key in fixed:
        if key in shape:
            setattr(cfg.model, key, shape[key])
    if not resuming and not cfg.model.vocab_size and src.tokenizer is not None:
        # 0 meant "the source's tokenizer"
        cfg.model.vocab_size = Tokenizer.load(src.tokenizer).vocab_size
    for key, value in asked.items():
        if getattr(cfg.model, key) != value:
            raise ConfigError(f"model.{key}={value!r}: the model's shape comes from "
                              f"{origin}, whose {key} is {getattr(cfg.model, key)!r}; drop "
                              "the override (or train from scratch without init.from)")
    return validate(cfg)


def load_into(model: nn.Module, state: dict, where: str, tied: TiedPairs,
              stage: bool = False) -> None:
    """Copy full weights into `model` (sharded or not), refusing missing, extra or
    mis-shaped tensors with a CheckpointError naming `where`: every tensor of the
    model's state dict is written (or re-tied), so the callers skip the random init
    (`writes_every_weight`, compress/artefact.py); `tied`: the family's
    tied pairs (ModelSpec.tied), whose heads the weights hold once, as the embedding.
    `stage`: `model` is one pipeline stage (parallel.pp > 1), which takes its own
    tensors of the whole model's (extra ones are the other stages'), a last stage's
    tied head copy from the embedding (hf_import.load_targets)."""
    targets = hf_import.load_targets(model, tied)
    needed = set(targets.values())
    missing, extra = sorted(needed - set(state)), sorted(set(state) - needed)
    if missing or (extra and not stage):
        raise CheckpointError(f"{where}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    ref = model.state_dict()
    for k, src in targets.items():
        if tuple(state[src].shape) != tuple(ref[k].shape):
            raise CheckpointError(f"{where}: {src} has shape {tuple(state[src].shape)}, the "
                                  f"model {tuple(ref[k].shape)}")
    load_full_state_dict(model, {k: state[src].to(ref[k].dtype) for k, src in targets.items()})
    tie(model, tied)


def writes_every_weight(cfg, resuming: bool = False) -> bool:
    """Whether `apply_init` will overwrite every parameter the model holds, so its random
    init can be skipped (models/registry.py `materialize(init=False)`): any init.from
    source, whose loaders refuse a model they do not fill — a Hugging Face directory
    (hf_import.load_hf_into, reading only this rank's slices: with the init, each rank
    also drew every parameter whole first) and a run directory, artefact or export
    (`load_into`: every tensor of the model's state dict, or CheckpointError). Not when
    resuming: init.from is not read then, the checkpoint is (and the trainer inits)."""
    return bool(cfg.init.from_) and not resuming


def apply_init(model: nn.Module, cfg, vocab_size: int | None = None,
               resuming: bool = False) -> nn.Module:
    """Trainer hook after the model is built: load `init.from`, draw the LoRA adapters.

    The model was converted (freeze / LoRA) on `meta`, before it was sharded (see
    `converter`), so the trained weights load into the LoRA layers' base weights under
    their plain names (hf_import.load_targets), each rank its own shard under FSDP2.
    `resuming` (see `resolve_init`): the checkpoint about to be loaded holds every
    weight, the frozen base of a LoRA run included (DCP saves all parameters), so
    init.from is not read (and the adapters drawn here are replaced by the saved ones).
    """
    if cfg.init.from_:
        if vocab_size and vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"data: the tokenizer has {vocab_size} tokens, more than the "
                              f"model of init.from ({cfg.model.vocab_size})")
        if not resuming:
            src = find_source(cfg.init.from_, cfg.init.weights)
            tied = spec_of(cfg.model).tied
            if src.kind == "hf":  # each rank reads only its own slices
                hf_import.load_hf_into(model, src.dir, tied)
            else:
                load_into(model, source_state(src), cfg.init.from_, tied,
                          stage=cfg.parallel.pp > 1)
    init_adapters(model, cfg.train.seed)  # a no-op without LoRA layers
    return model


def converter(cfg) -> Callable[[nn.Module], nn.Module] | None:
    """The freeze / LoRA conversion of `cfg` (None without either), which the trainer
    applies to the model on `meta`, before TP / FSDP / DDP (parallel/parallelize.py
    `build_parallel_model(convert=)`): FSDP2 then shards the adapters with the block
    they sit in and reduce-scatters only their gradients, and no layout sees a
    parameter appear after it took the model's. Its weights come after, in
    `apply_init`."""
    f = cfg.finetune
    if not (f.freeze or f.lora_rank):
        return None

    def convert(model: nn.Module) -> nn.Module:
        if f.freeze:
            freeze(model, f.freeze)
        if f.lora_rank:
            apply_lora(model, f.lora_rank, f.lora_alpha, f.lora_targets, f.lora_dropout)
        return model
    return convert


def prepare_loaded_model(model: nn.Module, cfg) -> nn.Module:
    """For loading a finished run: a LoRA run saved only its adapters, so rebuild the
    base from `init.from` and wrap it before the adapters are read. Else unchanged."""
    if not cfg.finetune.lora_rank:
        return model
    if not Path(cfg.init.from_).is_dir():  # the one thing a LoRA run does not carry
        raise CheckpointError(f"init.from: '{cfg.init.from_}' is gone; a LoRA run stores "
                              "only its adapters and needs its base: pass "
                              "--init.from=<the base's directory now>")
    load_into(model, source_state(find_source(cfg.init.from_, cfg.init.weights)),
              cfg.init.from_, spec_of(cfg.model).tied)
    return apply_lora(model, cfg.finetune.lora_rank, cfg.finetune.lora_alpha,
                      cfg.finetune.lora_targets)
