"""Tokenize a split in worker processes and write it as one flat binary token file.

The file format is the simplest one a memory map can read (nanoGPT's `train.bin`): the
token ids of every document, each followed by the end-of-text id, as little-endian
`uint16` (vocabularies up to 65536) or `uint32`, with no header — dtype and length live in
manifest.json. Documents are tokenized independently, so the bytes written do not depend
on how they are chunked or on the number of workers (a tested property).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scaletrain.data.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20
"""Documents are sent to workers in chunks of about this many characters: large enough
to amortise pickling, small enough to keep both workers busy and the progress bar live."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _chunks(texts: Sequence[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for t in texts:
        chunk.append(t)
        size += len(t)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# Per-process state of a worker, set once by `_init_worker` (the tokenizer is sent as a
# JSON string because the Rust object does not pickle cheaply).
_WORKER: tuple[Tokenizer, np.dtype] | None = None


def _init_worker(tok_json: str, dtype: str) -> None:
    # Each worker is one of `prep_workers` processes: keep the library's own thread pool
    # out of it, or 2 workers would each start threads for every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER
    _WORKER = (Tokenizer.from_str(tok_json), np.dtype(dtype))


def _encode_chunk(texts: list[str], tok: Tokenizer | None = None,
                  dtype: np.dtype | None = None) -> np.ndarray:
    """Token ids of `texts`, each document followed by end-of-text, as one array."""
    if tok is None:
        assert _WORKER is not None, "worker not initialised"
        tok, dtype = _WORKER
    parts = []
    for ids in tok.encode_batch(texts):
        ids.append(tok.eot_id)
        parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class Encoder:
    """Tokenizes chunks of documents inline (1 worker) or in a pool of worker processes.

    The pool uses 'spawn', not 'fork': safe with threads already running in the parent
    (torch, tokenizers), and the same on every OS. One pool serves all three splits, so
    the workers' start-up (~0.3 s each) is paid once. `map` yields results in submission
    order, so the bytes written are identical to the inline ones.
    """

    def __init__(self, tok: Tokenizer, workers: int):
        self.tok, self.dtype = tok, token_dtype(tok.vocab_size)
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(tok.to_str(), self.dtype.str))

    def map(self, chunks: list[list[str]]) -> Iterator[np.ndarray]:
        """Token arrays of `chunks`, in order."""
        if self._pool is None or len(chunks) < 2:
            return (_encode_chunk(c, self.tok, self.dtype) for c in chunks)
        return self._pool.map(_encode_chunk, chunks)

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def write_split(texts: Sequence[str], enc: Encoder, path: Path, *,
                progress: bool = False, desc: str = "tokenize") -> dict:
    """Tokenize `texts` in order into `path`; returns counts of documents, tokens, bytes."""
    chunks = list(_chunks(texts))
    n_tokens = 0
    with open(path, "wb") as f, tqdm(total=len(texts), desc=desc, unit="doc",
                                     disable=not progress) as bar:
        for chunk, arr in zip(chunks, enc.map(chunks)):
            f.write(arr.tobytes())
            n_tokens += arr.size
            bar.update(len(chunk))
            bar.set_postfix(tokens=n_tokens, refresh=False)
    return {
        "documents": len(texts),
        "tokens": n_tokens,
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "file": path.name,
    }
