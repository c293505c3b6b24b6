"""Windows of whole conversations for chat SFT, with targets masked to the trained tokens.

A sample is one row of T+1 tokens (T = seq_len) cut from the split's stream
(chat_prepare.py): 'pack' puts consecutive conversations, in order, into a row while
they fit whole; 'pad' one conversation per row. The rest of a row is end-of-text
padding, never a target; a conversation longer than T+1 tokens is cut to its first T+1.
Because a row is always a contiguous slice of the stream, it is two numbers (start,
length). Inputs are the row's first T tokens; target j is token j+1 where the mask says
it is trained on, else IGNORE_INDEX — so the step's global count of targets
(models/losses.py `count_targets`) counts only trained tokens. Rows without a single
target (an assistant turn cut off by the window) are left out: they cost a forward and
teach nothing.

Padding sits after every real token, so under causal attention it changes no real
token's logits; with data.document_masking packed conversations do not see each other
(each ends with the end-of-text id, models/documents.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scaletrain.data.shards import DOCS_SUFFIX, MASK_SUFFIX
from scaletrain.errors import DataError
from scaletrain.models.losses import IGNORE_INDEX


def pack_rows(starts: np.ndarray, mask: np.ndarray, row_len: int,
              packing: str) -> tuple[np.ndarray, np.ndarray]:
    """(row starts, row lengths), int64, for conversations at `starts` (n+1 offsets, the
    last = stream length) in rows of at most `row_len` tokens; rows with no target
    (mask[1:] of the row all 0) dropped."""
    lengths = np.diff(starts)
    rows: list[tuple[int, int]] = []
    s, n = int(starts[0]), 0
    for i, L in enumerate(lengths.tolist()):
        if packing == "pack" and n and n + L <= row_len:
            n += L
            continue
        if n:
            rows.append((s, n))
        s, n = int(starts[i]), min(L, row_len)
    if n:
        rows.append((s, n))
    r = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    # Targets per row = trained tokens at positions 1..n-1 (position 0 predicts nothing).
    cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    targets = cum[r[:, 0] + r[:, 1]] - cum[r[:, 0] + 1]
    keep = targets > 0
    return r[keep, 0], r[keep, 1]


class ChatWindows:
    """The packed (or padded) conversation rows of one split; `batch(idx)` as
    datasets.TokenWindows: (inputs, targets) int64 (B, T)."""

    def __init__(self, path: str | Path, dtype: str, seq_len: int, eot_id: int,
                 packing: str):
        path = Path(path)
        self.path, self.seq_len, self.eot_id = path, int(seq_len), int(eot_id)
        self.tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        self.mask = np.memmap(path.with_suffix(MASK_SUFFIX), dtype=np.uint8, mode="r")
        starts = np.fromfile(path.with_suffix(DOCS_SUFFIX), dtype="<i8")
        if len(self.mask) != len(self.tokens) or starts[-1] != len(self.tokens):
            raise DataError(f"{path.parent}: the {path.stem} split's token, mask and "
                            "conversation files disagree; the directory is corrupt")
        self.starts, self.lengths = pack_rows(starts, self.mask, self.seq_len + 1, packing)
        if not len(self.starts):
            raise DataError(f"{path.stem} split of {path.parent} has no window with a "
                            f"target token at seq_len={self.seq_len}")
        self._offsets = np.arange(self.seq_len + 1)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 (B, T), of rows `idx`; untrained targets IGNORE_INDEX."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        pos = self.starts[idx, None] + self._offsets  # (B, T+1)
        valid = self._offsets < self.lengths[idx, None]
        pos = np.minimum(pos, len(self.tokens) - 1)  # padding reads are masked below
        w = np.where(valid, self.tokens[pos].astype(np.int64), self.eot_id)
        m = valid & (self.mask[pos] != 0)
        y = np.where(m[:, 1:], w[:, 1:], IGNORE_INDEX)
        return (torch.from_numpy(np.ascontiguousarray(w[:, :-1])),
                torch.from_numpy(np.ascontiguousarray(y)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(np.array([i]))
        return x[0], y[0]
