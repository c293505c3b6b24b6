"""`check_source_shapes`: do init.from's weights have the shapes its config describes?

Run on the command line before anything is launched or created (cli.py `_preflight`),
so a source whose config.toml disagrees with its weights (an edited copy, a file from
another run) ends with one line and no new run directory; the trainer's load
(init_from.py `load_into`) would refuse it too, but only after the run dir exists.

Reads only the safetensors headers (`safe_open(...).get_slice(name).get_shape()`) and
builds the model on the `meta` device: no weight is read, nothing is allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from scaletrain.config.run_files import CONFIG_FILE
from scaletrain.errors import CheckpointError
from scaletrain.finetune.hf_import import load_targets
from scaletrain.finetune.init_from import Source, find_source, lora_base
from scaletrain.finetune.lora import adapter_only
from scaletrain.models.contract import TiedPairs
from scaletrain.models.registry import spec_of

# Where each kind of source keeps the config its weights must fit (init_from.find_source).
_CONFIG_OF = {"run": CONFIG_FILE, "artefact": CONFIG_FILE,
              "safetensors": "metadata's scaletrain_config"}


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header (no tensor data read)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_source_shapes(cfg) -> None:
    """CheckpointError (one line) if `cfg`'s init.from holds tensors the model of `cfg`
    (already shaped by `resolve_init`) does not, lacks some, or has other shapes.

    Skipped where the check lives elsewhere or needs what is not known yet: a Hugging
    Face directory (hf_import.check_hf_dir compares its headers with its config.json),
    an image family (its shape comes from the data's facts) and a vocabulary the data
    fixes later (vocab_size 0). The whole model is compared, also for a pipeline run
    (each stage then takes its part of the same full file)."""
    if not cfg.init.from_:
        return
    spec = spec_of(cfg.model)
    if not spec.source_fields or not cfg.model.vocab_size:
        return
    src = find_source(cfg.init.from_, cfg.init.weights)
    if src.kind == "hf":
        return
    with torch.device("meta"):  # shapes only: allocates nothing
        model = spec.build(cfg.model, {"vocab_size": cfg.model.vocab_size})
    _check(model, spec.tied, src, f"init.from='{cfg.init.from_}'")


def _check(model: nn.Module, tied: TiedPairs, src: Source, where: str) -> None:
    if src.kind == "hf":  # a LoRA run's HF base: check_hf_dir compared it with its config
        return
    shapes = header_shapes(src.weights)
    adapters = adapter_only(shapes)
    if shapes and adapters is not shapes:  # a LoRA run: its base's weights + adapters
        base, _ = lora_base(src)
        _check(model, tied, base, f"{where} (its base '{base.dir}')")
        _check_adapters(model, adapters, src, where)
        return
    targets = load_targets(model, tied)
    needed = set(targets.values())
    missing, extra = sorted(needed - set(shapes)), sorted(set(shapes) - needed)
    described = _CONFIG_OF[src.kind]
    if missing or extra:
        raise CheckpointError(f"{where}: {src.weights.name} does not match the model its "
                              f"{described} describes (missing {missing[:3]}, unexpected "
                              f"{extra[:3]})")
    ref = model.state_dict()
    for name, stored in targets.items():  # model order: the embedding first
        want = tuple(ref[name].shape)
        if shapes[stored] != want:
            raise CheckpointError(f"{where}: {stored} has shape {shapes[stored]} in "
                                  f"{src.weights.name}, but the model its {described} "
                                  f"describes has {want}")


def _check_adapters(model: nn.Module, adapters: dict[str, tuple[int, ...]], src: Source,
                    where: str) -> None:
    """Each saved adapter pair A (r, in), B (out, r) fits its layer's weight (out, in)."""
    ref = model.state_dict()
    for key in sorted(k for k in adapters if k.endswith(".lora_A")):
        layer = key[:-len(".lora_A")]
        a, b = adapters[key], adapters.get(f"{layer}.lora_B")
        w = ref.get(f"{layer}.weight")
        if b is None or w is None or len(a) != 2 or len(b) != 2 or a[0] != b[1] \
                or (b[0], a[1]) != tuple(w.shape):
            raise CheckpointError(
                f"{where}: the adapters of {layer} in {src.weights.name} (lora_A {a}, "
                f"lora_B {b}) do not fit the layer of its {CONFIG_FILE} "
                f"({None if w is None else tuple(w.shape)})")
