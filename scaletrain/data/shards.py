"""The flat binary token file of a split (written by `dt_steps.TokenizePart`).

The file format is the simplest one a memory map can read (nanoGPT's `train.bin`): the
token ids of every document, each followed by the end-of-text id, as little-endian
`uint16` (vocabularies up to 65536) or `uint32`, with no header — dtype and length live in
manifest.json. Documents are tokenized independently, so the bytes written do not depend
on how they are chunked or on the number of workers (a tested property).

Kept rather than datatrove's tokenized shards (`DocumentTokenizer`: .ds files plus a
.ds.index of document ends and a .ds.loss mask): the loaders, the resume position and
every run prepared so far read this layout; document ends are the end-of-text ids, so a
document index can be derived from it when packing needs one.
"""

from __future__ import annotations

import numpy as np

CHUNK_CHARS = 16 << 20
"""A split is written (and tokenized, one datatrove task each) in parts of about this
many characters: large enough that per-task costs vanish, small enough that a large
corpus spreads over every worker."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


MASK_SUFFIX, DOCS_SUFFIX = ".mask.bin", ".docs.bin"
"""Chat data (data/chat_prepare.py) beside each `<split>.bin`: `<split>.mask.bin`, uint8
per token (1 = a target the loss covers), and `<split>.docs.bin`, little-endian int64
offsets of every conversation's first token, then the stream length."""
