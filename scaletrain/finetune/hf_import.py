"""Read a Hugging Face `save_pretrained` directory into a scaletrain family: the
architecture check, the weights index, and the shard-by-shard, slice-by-slice load.

Each family says how its names and config map (`ModelSpec.hf`, models/hf_map.py: GPT-2
in models/gpt_hf.py, Llama / Qwen2 / Qwen3 / Mistral in models/llama_hf.py); this module
knows only the directory format: `config.json`, and either `model.safetensors` or
`model.safetensors.index.json` naming the shard of every tensor. Only safetensors are
read (never a pickle), without importing transformers.

Loading big checkpoints: `load_hf_into` walks the shards one at a time and copies into
each parameter only the part this rank holds — the local block of a DTensor (FSDP2,
TP; for the stacked experts under expert parallelism, only the per-expert tensors of the
experts this rank owns), read by finetune/hf_reads.py (one pread of whole rows, else
safetensors' `get_slice`), so the bytes of other ranks' blocks are never touched and no
rank ever holds the whole model.
Everything a user can get wrong in the directory (unsupported architecture, a shard
listed in the index but missing, shapes that disagree with config.json) is found by
`check_hf_dir`, which reads only headers, before anything is launched or written.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.finetune.hf_reads import BlockReader
from scaletrain.finetune.lora import base_names, is_adapter
from scaletrain.models.contract import TiedPairs, param_at, stored_once, tie
from scaletrain.models.hf_map import HFMap
from scaletrain.models.registry import REGISTRY, spec_of

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _maps() -> dict[str, HFMap]:
    return {arch: spec.hf for spec in REGISTRY.values() if spec.hf is not None
            for arch in spec.hf.architectures}


def read_config(path: Path) -> tuple[dict, HFMap]:
    """(config.json, the family map of its architecture); CheckpointError naming an
    architecture no family reads, with the ones that are read."""
    f = path / "config.json"
    try:
        c = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable JSON config ({e})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{f}: not a config.json (a JSON object)")
    maps = _maps()
    # Without "architectures" (older saves) the model_type names it; the families'
    # model_fields then read the architecture they were given (Qwen2's biases, ...).
    by_type = {t: a for spec in REGISTRY.values() if spec.hf is not None
               for t, a in spec.hf.model_types}
    arch = (c.get("architectures") or [by_type.get(c.get("model_type"), "")])[0]
    if arch not in maps:
        raise CheckpointError(f"{f}: architecture {arch or c.get('model_type')!r} is not "
                              f"supported (supported: {', '.join(maps)})")
    return {**c, "architectures": [arch]}, maps[arch]


def hf_model_fields(path: Path) -> dict:
    """scaletrain `model.*` fields (with "name") of a HF directory's config.json."""
    c, m = read_config(path)
    return m.model_fields(c, str(path / "config.json"))


class HFWeights:
    """The tensors of a HF directory by scaletrain name: which file holds each, its HF
    name and shape in scaletrain's orientation (headers only; nothing is read yet).
    `tied`: the family's tied pairs, whose heads are read as their embedding."""

    def __init__(self, path: Path, hfmap: HFMap, tied: TiedPairs):
        self.path, self.map = path, hfmap
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        # Our 3-D expert parameters stored one tensor per expert: {name: {expert:
        # (file, HF name, stored (out, in) shape)}} (HFMap.stacked, models/moe_hf.py).
        self.parts: dict[str, dict[int, tuple[Path, str, tuple]]] = defaultdict(dict)
        for file, names in self._files().items():
            try:
                with safe_open(str(file), "pt") as f:
                    for hf_name in names or f.keys():
                        ours = hfmap.to_ours(hf_name)
                        if ours is None or stored_once(ours, tied):
                            continue  # not a weight, or a tied head (its embedding's)
                        sl = f.get_slice(hf_name)
                        shape = tuple(sl.get_shape())
                        part = hfmap.stacked(ours) if hfmap.stacked else None
                        if part is not None:
                            self.parts[part[0]][part[1]] = (file, hf_name, shape)
                            self.dtypes[part[0]] = sl.get_dtype()
                            continue
                        self.where[ours] = (file, hf_name)
                        self.shapes[ours] = shape[::-1] if self.transposed(ours) else shape
                        self.dtypes[ours] = sl.get_dtype()
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        for name, parts in self.parts.items():
            shapes = {p[2] for p in parts.values()}
            if sorted(parts) != list(range(len(parts))) or len(shapes) != 1:
                raise CheckpointError(f"'{path}': the experts of {hfmap.to_hf(name)} are "
                                      f"not 0..E-1 of one shape ({sorted(parts)[:8]})")
            out_f, in_f = shapes.pop()
            self.shapes[name] = (len(parts), in_f, out_f)

    def expert(self, name: str, j: int) -> torch.Tensor:
        """Expert j of stacked parameter `name`, in our (in, out) orientation."""
        file, hf_name, _ = self.parts[name][j]
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(hf_name).t()

    def transposed(self, name: str) -> bool:
        return name.endswith(self.map.transposed) if self.map.transposed else False

    def _files(self) -> dict[Path, list[str] | None]:
        """file -> the HF names the index puts there (None: every tensor it holds)."""
        index = self.path / INDEX
        if not index.is_file():
            if not (self.path / SINGLE).is_file():
                raise CheckpointError(f"'{self.path}': no {SINGLE} nor {INDEX} (save_pretrained "
                                      "with safe_serialization, the default)")
            return {self.path / SINGLE: None}
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        files: dict[Path, list[str]] = defaultdict(list)
        for hf_name, file in weight_map.items():
            if Path(file).name != file or not file.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard {file!r} is not a .safetensors file "
                                      "in the directory")
            files[self.path / file].append(hf_name)
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: shard '{file.name}' listed in the index is "
                                      "missing")
        return dict(files)

    def by_file(self, names) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            if n not in self.parts:  # stacked experts: read expert by expert (`expert`)
                out[self.where[n][0]].append(n)
        return dict(out)


def check_against(weights: HFWeights, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """The tensors the model needs, each with the shape config.json implies."""
    missing = sorted(set(expected) - set(weights.shapes))
    extra = sorted(set(weights.shapes) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: the safetensors do not match config.json (missing "
                              f"{missing[:3]}, unexpected {extra[:3]})")
    for name, shape in expected.items():
        if weights.shapes[name] != shape:
            raise CheckpointError(f"{where}: {weights.map.to_hf(name)} has shape "
                                  f"{list(weights.shapes[name])} in the safetensors, "
                                  f"config.json implies {list(shape)}")


def expected_shapes(model: nn.Module, tied: TiedPairs) -> dict[str, tuple[int, ...]]:
    """Full shapes of the tensors a weights file holds for `model` (meta or sharded)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not stored_once(k, tied)}


def check_hf_dir(path: Path) -> dict:
    """The model fields of HF directory `path`, after checking its architecture, its
    shards and every tensor's shape against config.json (headers only)."""
    c, hfmap = read_config(path)
    fields = hfmap.model_fields(c, str(path / "config.json"))
    mcfg = ModelConfig(**fields)
    spec = spec_of(mcfg)
    try:
        if spec.check is not None:  # the family's rules (head counts, ...) first
            spec.check(mcfg)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    with torch.device("meta"):
        model = spec.build(mcfg, {})
    check_against(HFWeights(path, hfmap, spec.tied), expected_shapes(model, spec.tied),
                  str(path / "config.json"))
    return fields


def _local_block(p: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(the tensor this rank writes into, the index of its block in the full tensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return p, tuple(slice(0, n) for n in p.shape)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                          p.placements)
    return p.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def load_targets(model: nn.Module, tied: TiedPairs) -> dict[str, str]:
    """{state-dict name of `model`: the stored tensor it is read from}. A tied head is
    read as its embedding only where the embedding is not here too (a pipeline's last
    stage holds a copy of it, parallel/parallelize.py `tied_copies`); where both are,
    `tie` makes the head the embedding's tensor after the load. `model` may be one
    pipeline stage: only what it holds is listed. A model converted to LoRA reads each
    base weight under its plain name and no adapter (lora.py `init_adapters` draws them)."""
    heads = dict(tied)
    plain = base_names(model)
    out = {}
    for k in model.state_dict():
        if is_adapter(k):
            continue
        if not stored_once(k, tied):
            out[k] = plain.get(k, k)
        elif k in heads and param_at(model, heads[k]) is None:
            out[k] = heads[k]
    return out


def _check_targets(weights: HFWeights, params: dict, targets: dict[str, str],
                   where: str) -> None:
    """Every tensor this (possibly one-stage) model holds is stored with its full shape.
    The directory as a whole (no extra tensors either) is check_hf_dir's: a pipeline
    stage holds a subset of it."""
    missing = sorted(src for src in set(targets.values()) if src not in weights.shapes)
    if missing:
        raise CheckpointError(f"{where}: the safetensors do not match the model (missing "
                              f"{missing[:3]})")
    for name, src in targets.items():
        if weights.shapes[src] != tuple(params[name].shape):
            raise CheckpointError(f"{where}: {weights.map.to_hf(src)} has shape "
                                  f"{list(weights.shapes[src])} in the safetensors, the "
                                  f"model {list(params[name].shape)}")


def _reads(weights: HFWeights, params: dict, targets: dict[str, str]) -> dict:
    """{file: [(destination tensor, HF name, block index in our orientation,
    transposed)]}: what this rank copies from each file. A stacked expert parameter
    (E, in, out) whose block holds experts [a, b) reads only experts a..b-1, each from
    its own per-expert tensor (stored (out, in)) into its slot of the local block: under
    expert parallelism a rank never touches the experts other ranks own."""
    out: dict[Path, list] = defaultdict(list)
    for name, src in targets.items():
        local, index = _local_block(params[name])
        if local.numel() == 0:
            continue
        if src in weights.parts:
            for slot, j in enumerate(range(index[0].start, index[0].stop)):
                file, hf_name, _ = weights.parts[src][j]
                out[file].append((local[slot], hf_name, index[1:], True))
        else:
            file, hf_name = weights.where[src]
            out[file].append((local, hf_name, index, weights.transposed(src)))
    return dict(out)


@torch.no_grad()
def load_hf_into(model: nn.Module, path: Path, tied: TiedPairs,
                 reader: BlockReader | None = None) -> None:
    """Copy HF directory `path`'s weights into `model` (plain or DTensor-sharded, the
    whole model or one pipeline stage), shard file by shard file, each parameter only in
    the block this rank holds (only the experts it owns, `_reads`), read by `reader`
    (finetune/hf_reads.py: whole rows with one pread, other blocks through safetensors'
    get_slice; a recording one in the tests), freed before the next tensor is read."""
    reader = reader or BlockReader()
    _, hfmap = read_config(path)
    weights = HFWeights(path, hfmap, tied)
    params = model.state_dict(keep_vars=True)
    targets = load_targets(model, tied)
    _check_targets(weights, params, targets, str(path))
    for file, reads in _reads(weights, params, targets).items():
        with reader.open(file) as f:
            for dest, hf_name, index, transposed in reads:
                block = f.block(hf_name, index, transposed, tuple(dest.shape))
                dest.copy_(block)
                del block  # before the next tensor: one block in memory at a time
    tie(model, tied)


def hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The full weights of a HF directory under scaletrain names, float32 (one
    process: eval, compress)."""
    c, hfmap = read_config(path)
    tied = spec_of(ModelConfig(**hfmap.model_fields(c, str(path / "config.json")))).tied
    weights = HFWeights(path, hfmap, tied)
    out = {}
    for file, names in weights.by_file(weights.where).items():
        with safe_open(str(file), "pt") as f:
            for name in names:
                t = f.get_tensor(weights.where[name][1])
                out[name] = (t.t() if weights.transposed(name) else t).float().contiguous()
    for name, parts in weights.parts.items():
        out[name] = torch.stack([weights.expert(name, j) for j in range(len(parts))]).float()
    return out
