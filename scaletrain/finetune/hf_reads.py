"""Reading one block of a stored safetensors tensor, and only that block's bytes
(finetune/hf_import.py `load_hf_into`, which says which block each rank needs).

A block of whole rows (an FSDP2 dim-0 shard, TP's row shards, a whole tensor — an
expert a rank owns under expert parallelism) is read with one pread of its contiguous
bytes; reading it through safetensors' memory map would leave the file's pages resident
in this process until the file closes. Any other block (a TP column shard, a Conv1D
weight's dim-0 shard) goes through safetensors' `get_slice`, which copies just the
block out of the map.

`BlockReader(log=[])` records every read as (HF name, stored block as (start, stop) per
dim, bytes): the tests count the tensors and bytes each rank actually read, the bench
reports them; with `log=None` nothing is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "F64": torch.float64}


def header(file: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def read_rows(file: Path, head: tuple[int, dict], name: str,
              index: tuple[slice, ...]) -> torch.Tensor | None:
    """The block `index` (stored orientation) of tensor `name`, flat, read with one
    pread when it is whole rows (contiguous bytes); None when it is not."""
    start, meta = head[0], head[1][name]
    shape, dtype = meta["shape"], DTYPES.get(meta["dtype"])
    if dtype is None or any(s.start != 0 or s.stop != n for s, n in zip(index[1:], shape[1:])):
        return None
    row = dtype.itemsize
    for n in shape[1:]:
        row *= n
    lo = start + meta["data_offsets"][0] + (index[0].start * row if shape else 0)
    size = (index[0].stop - index[0].start) * row if shape else dtype.itemsize
    buf = bytearray(size)
    with open(file, "rb", buffering=0) as fh:
        fh.seek(lo)
        fh.readinto(buf)
    return torch.frombuffer(buf, dtype=dtype) if size else torch.empty(0, dtype=dtype)


class BlockReader:
    """Reads blocks of the tensors of one safetensors file at a time (`open(file)`),
    recording each read in `log` when one is given (module docstring)."""

    def __init__(self, log: list | None = None):
        self.log = log

    def open(self, file: Path) -> "FileBlocks":
        return FileBlocks(file, self.log)


class FileBlocks:
    """One open safetensors file: `block(name, index, transposed)` is the block `index`
    of stored tensor `name` in our orientation (`transposed`: stored as our transpose,
    as HF's per-expert (out, in) Linear weights and GPT-2's Conv1D are)."""

    def __init__(self, file: Path, log: list | None):
        self.file, self.log = file, log
        self.head = header(file)
        self.f = None

    def __enter__(self) -> "FileBlocks":
        self.f = safe_open(str(self.file), "pt").__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.f.__exit__(*exc)

    def block(self, name: str, index: tuple[slice, ...], transposed: bool,
              shape: tuple[int, ...]) -> torch.Tensor:
        """The block, shaped `shape` (ours), copied out of the file."""
        stored = index[::-1] if transposed else index
        t = read_rows(self.file, self.head, name, stored)
        if t is None:  # not whole rows: copy the block out of the map
            t = self.f.get_slice(name)[stored]
        t = t.reshape(tuple(s.stop - s.start for s in stored))
        if self.log is not None:
            self.log.append((name, tuple((s.start, s.stop) for s in stored),
                             t.numel() * t.element_size()))
        return (t.t() if transposed else t).reshape(shape)
