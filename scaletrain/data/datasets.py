"""Map-style datasets with a batched `batch(idx)` accessor for the sampler and loader.

Both return whole batches from an index array instead of one sample at a time: one
fancy-indexing call per batch is far cheaper than B `__getitem__` calls plus a collate.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scaletrain.errors import DataError


class TokenWindows:
    """Non-overlapping windows of a flat token file, for next-token prediction.

    Sample i covers tokens[i*T : i*T + T + 1] (T = seq_len): inputs are its first T tokens,
    targets the last T, i.e. the inputs shifted by one. Windows share their boundary token,
    so every token but the very first is a target exactly once per epoch;
    len = (n_tokens - 1) // T, and a tail shorter than a window is not used.
    Windows cross document boundaries; the end-of-text token between documents tells the
    model where one ends (as in GPT-2 training).
    """

    def __init__(self, path: str | os.PathLike, dtype: str | np.dtype, seq_len: int):
        path = Path(path)
        self.path, self.seq_len = path, int(seq_len)
        # Token files are written little-endian (shards.py), whatever this machine is.
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if not path.is_file():
            raise DataError(f"{path}: token file not found")
        size = path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"{path}: size {size} is not a multiple of the {self.dtype.name}"
                            f" token size; the file is truncated or corrupt")
        self.n_tokens = size // self.dtype.itemsize
        if self.n_tokens < self.seq_len + 1:
            split = path.stem
            raise DataError(f"{split} split of {path.parent} has {self.n_tokens} tokens, "
                            f"fewer than seq_len+1={self.seq_len + 1}")
        # mode 'r': read-only and shared by every process/thread mapping the file; the OS
        # page cache holds it once, however many ranks read it.
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r")
        self._offsets = np.arange(self.seq_len + 1)

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def windows(self, idx: np.ndarray) -> np.ndarray:
        """The (B, T+1) int64 token windows of the samples `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        rows = idx[:, None] * self.seq_len + self._offsets  # (B, T+1) token positions
        return self.tokens[rows].astype(np.int64)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 (B, T), of the samples `idx`."""
        return split_windows(self.windows(idx))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i as (inputs (T,), targets (T,))."""
        x, y = self.batch(np.array([i]))
        return x[0], y[0]


def split_windows(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of (B, T+1) windows: the first T tokens and the last T."""
    # Contiguous copies: callers flatten with .view(-1), which a strided slice refuses.
    return (torch.from_numpy(np.ascontiguousarray(w[:, :-1])),
            torch.from_numpy(np.ascontiguousarray(w[:, 1:])))


class ArrayDataset:
    """In-memory (x, y) arrays, e.g. images (N, C, H, W) float32 and labels (N,) int64."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.ascontiguousarray(y, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 (B, ...), y int64 (B,)) of the samples `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.x[i]), torch.tensor(self.y[i])


class MixtureWindows:
    """Several sources' `TokenWindows` (one tokenizer, one seq_len) as one index space:
    sample `offsets[i] + j` is sample j of source i. The loader draws from it with a
    `MixtureSampler` (data/mixture.py), which gives each source its `weights` share;
    as a plain dataset (eval tools) it is the sources' samples one after the other.
    `weights` are normalised to sum to 1.
    """

    def __init__(self, parts: list[TokenWindows], names: list[str], weights: list[float]):
        if not parts or not len(parts) == len(names) == len(weights):
            raise ValueError(f"{len(parts)} parts, {len(names)} names, {len(weights)} weights")
        if len({p.seq_len for p in parts}) != 1:
            raise ValueError("the sources of a mixture must have one seq_len")
        total = float(sum(weights))
        self.parts, self.names = list(parts), list(names)
        self.weights = [float(w) / total for w in weights]
        self.sizes = [len(p) for p in parts]
        self.offsets = np.cumsum([0, *self.sizes]).astype(np.int64)
        self.seq_len = parts[0].seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 (B, T), of the samples `idx`, in `idx`'s order."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        src = np.searchsorted(self.offsets, idx, side="right") - 1  # (B,) source of each
        # Filled in numpy: a boolean-mask assignment into a torch tensor cost ~20 ms per
        # source for a 512 x 128 batch here (bench/mixture_sampler.py), numpy's ~0.1 ms.
        w = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        for i in np.unique(src):
            rows = np.flatnonzero(src == i)
            w[rows] = self.parts[i].windows(idx[rows] - self.offsets[i])
        return split_windows(w)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(np.array([i]))
        return x[0], y[0]
