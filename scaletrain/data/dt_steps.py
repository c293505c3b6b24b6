"""The steps of the text preparation pipeline, as datatrove pipeline steps.

read (`SourceReader`) -> clean (`Clean`) -> datatrove's quality filters (`filters.py`)
-> write the cleaned shard of this task (`CleanedWriter`); for MinHash, exact dedup into
parts in the sources' order (`MergeDedup`) that datatrove's MinHash steps read back
(`CleanedReader`); then, in one task, exact dedup and split (`DedupSplit`), which merges
the shards back into the sources' order; then one task per split part tokenizes it
(`TokenizePart`, which also counts documents per length bin). Every step streams
documents one at a time: memory holds a document, a record batch, a chunk of documents
being tokenized or a sorted run of digests (`dedup_runs.py`), never the corpus nor one
entry per document, so it does not grow with the corpus (issue #16). Between
stages documents live in JSON-lines files in the work directory, so each stage is a
separate datatrove job whose tasks can run in any order and on any worker.

Counts are datatrove stats (`stat_update`), summed over the tasks by the executor and
read back by `pipeline.py` into the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.base import BaseReader
from datatrove.utils.logging import logger

from scaletrain.data.clean import SPLITS, Skip, hash_uniform, normalize_text
from scaletrain.data import shards
from scaletrain.data.dedup_runs import FAN_IN, RUN_RECORDS, duplicate_positions
from scaletrain.data.records import iter_records
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.data.heap import trim_heap

CHUNK_DOCS = 256
"""Documents handed to `encode_batch` at once inside a tokenize task..."""

CHUNK_TEXT_CHARS = 1 << 20
"""...or fewer, holding at most this many characters (a longer document alone; `chunks`):
a chunk's `Encoding`s and id lists take ~130 bytes a token (measured: 2.7M characters
of Python source, 0.82M tokens, +107 MB), so a chunk of 256 large files would hold hundreds of MB; bounded by characters, a
tokenize task's memory does not depend on document sizes. 1M characters rather than
4M: the peak of `prepare` with 2 workers fell by 84 MiB on 8 MB and 112 MiB on 64 MB
(bench/results/prepare_stages.md); the ids do not depend on it (documents are encoded
one by one), and one run each on this loaded machine showed no slow-down (64 MB: 220 s,
305 s before), a noisy figure, not a throughput claim."""


class QuietExecutor(LocalPipelineExecutor):
    """datatrove's local executor, logging each task to its file under the logging dir
    and only errors to the console (`prepare` prints its own summary)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        # datatrove prints INFO logs only for local_rank 0; every task counts as "not 0".
        try:
            return super()._run_for_rank(rank, 1, node_rank)
        finally:
            quiet_logs()  # a finished task puts back loguru's default (INFO) console sink


def quiet_logs() -> None:
    """Only errors of datatrove's loguru logger reach the console."""
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


class SourceReader(BaseReader):
    """Reads the records of the source files; task `rank` reads files rank, rank + n, ...

    `files` is [(path, format, source index)] in the sources' sorted order; a document's
    metadata keeps its (file, record) position so that later stages restore that order.
    """

    name = "scaletrain sources"

    def __init__(self, files: list[tuple[str, str, int]], text_key: str):
        super().__init__(text_key=text_key)
        self.files = files

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        for file_idx in range(rank, len(self.files), world_size):
            path, fmt, src = self.files[file_idx]
            for rec, raw in enumerate(iter_records(Path(path), fmt, self.text_key)):
                self.stat_update("records", f"records/src{src}")
                if raw is Skip.BINARY:
                    self.stat_update("skipped_binary")
                elif raw is Skip.UNDECODABLE:
                    self.stat_update("skipped_undecodable")
                elif raw is Skip.MALFORMED:
                    self.stat_update("malformed", f"malformed/src{src}")
                else:
                    yield Document(text=raw, id=f"{file_idx}/{rec}",
                                   metadata={"file": file_idx, "rec": rec, "src": src})


class Clean(PipelineStep):
    """Today's cleaning (`clean.normalize_text`: newlines, NFC, trailing whitespace) and
    the minimum length: documents shorter than `min_chars` (the final newline not
    counted) and empty ones are dropped."""

    name = "clean"

    def __init__(self, min_chars: int):
        super().__init__()
        self.min_chars = min_chars

    def run(self, data: DocumentsPipeline, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            text = normalize_text(doc.text)
            if not text or len(text) - 1 < self.min_chars:
                self.stat_update("too_short")
                continue
            doc.text = text
            yield doc


class CleanedWriter(PipelineStep):
    """Writes this task's documents to `<work>/<folder>/<rank>.jsonl`, one
    [file, record, source, sha256 hex, text] per line, in the order they come."""

    name = "write cleaned"

    def __init__(self, work: str, folder: str = "clean"):
        super().__init__()
        self.work, self.folder = work, folder

    def run(self, data: DocumentsPipeline, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.work, self.folder, f"{rank:05d}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for doc in data:
                m = doc.metadata
                h = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
                f.write(json.dumps([m["file"], m["rec"], m["src"], h, doc.text]) + "\n")
        return iter(())


class CleanedReader(PipelineStep):
    """Task `rank` reads `<work>/<folder>/<parts[rank]>.jsonl` (the `CleanedWriter` /
    `MergeDedup` line format) back into documents, in order, so that datatrove's MinHash
    steps, which number a task's documents by position, see the same stream twice."""

    name = "read cleaned"

    def __init__(self, work: str, folder: str, parts: list[str]):
        super().__init__()
        self.work, self.folder, self.parts = work, folder, parts

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        for file_idx, rec, src, _h, text in _lines(
                Path(self.work, self.folder, f"{self.parts[rank]}.jsonl")):
            yield Document(text=text, id=f"{file_idx}/{rec}",
                           metadata={"file": file_idx, "rec": rec, "src": src})


def _lines(path: Path) -> Iterator[list]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _merged(work: Path, folder: str) -> Iterator[list]:
    """The cleaned shards of `<work>/<folder>` merged back into (file, record) order."""
    shards_ = sorted((work / folder).glob("*.jsonl"))
    return heapq.merge(*(_lines(p) for p in shards_), key=lambda r: (r[0], r[1]))


def _first_copies(step: PipelineStep, work: Path, folder: str, run_records: int,
                  fan_in: int) -> Iterator[list]:
    """`_merged(work, folder)` without the documents whose text (sha256) came earlier
    in it, each counted as a "duplicates" stat of `step`. Two passes over the shards:
    the first finds the duplicates' positions on disk (`dedup_runs`), so memory does
    not grow with the number of documents; JSON decoding is cheap beside tokenizing."""
    dups = duplicate_positions((bytes.fromhex(r[3]) for r in _merged(work, folder)),
                               work / f"dedup-{folder}", run_records, fan_in)
    next_dup = next(dups, None)
    for pos, r in enumerate(_merged(work, folder)):
        if pos == next_dup:
            step.stat_update("duplicates")
            next_dup = next(dups, None)
            continue
        yield r


class MergeDedup(PipelineStep):
    """`data.dedup = "minhash"`, first: exact dedup over the cleaned shards merged into
    the sources' order, written back as `<work>/merged/<n>.jsonl` parts of about
    `shards.CHUNK_CHARS` characters. MinHash then runs one task per part: which copy of
    a near-duplicate survives depends on the sources' order only, not on how many
    workers read them. Writes `<work>/merged.json`, the part names."""

    name = "merge + exact dedup"

    def __init__(self, work: str, run_records: int = RUN_RECORDS, fan_in: int = FAN_IN):
        super().__init__()
        self.work, self.run_records, self.fan_in = work, run_records, fan_in

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        work = Path(self.work)
        out = work / "merged"
        out.mkdir(parents=True, exist_ok=True)
        names, f, chars = [], None, shards.CHUNK_CHARS
        for r in _first_copies(self, work, "clean", self.run_records, self.fan_in):
            if chars >= shards.CHUNK_CHARS:
                if f is not None:
                    f.close()
                names.append(f"{len(names):05d}")
                f, chars = open(out / f"{names[-1]}.jsonl", "w", encoding="utf-8"), 0
            f.write(json.dumps(r) + "\n")
            chars += len(r[4])
        if f is not None:
            f.close()
        (work / "merged.json").write_text(json.dumps(names))
        return iter(())


class DedupSplit(PipelineStep):
    """Exact dedup and the train/val/test split, in one task over every shard of
    `<work>/<folder>` (`clean`, or `deduped` after MinHash).

    The shards are merged back into (file, record) order, so "the first copy is kept"
    means what it did when one process read the files in sorted order. Memory holds
    neither the documents nor their digests: the duplicates are found on disk, in
    sorted runs of `run_records` (`dedup_runs.py`), so it does not grow with the corpus
    (tests/unit/test_data_bounded.py). The split
    is `clean.split_documents`'s: by the digest, and an empty wanted split gets the
    smallest digest of the largest one. Writes `<work>/split/<split>-<n>.jsonl` parts of
    about `part_chars` characters, [source, sha256 hex, text] lines, and
    `<work>/parts.json` listing them.
    """

    name = "dedup + split"

    def __init__(self, work: str, val_fraction: float, test_fraction: float,
                 part_chars: int, folder: str = "clean", run_records: int = RUN_RECORDS,
                 fan_in: int = FAN_IN):
        super().__init__()
        self.work, self.val, self.test = work, val_fraction, test_fraction
        self.part_chars, self.folder = part_chars, folder
        self.run_records, self.fan_in = run_records, fan_in  # dedup_runs.py

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        work = Path(self.work)
        writers = {s: _PartWriter(work / "split", s, self.part_chars) for s in SPLITS}
        for _file, _rec, src, h, text in _first_copies(self, work, self.folder,
                                                       self.run_records, self.fan_in):
            u = hash_uniform(bytes.fromhex(h))
            s = "val" if u < self.val else "test" if u < self.val + self.test else "train"
            writers[s].write(src, h, text)
        for w in writers.values():
            w.close()
        self._fill_empty_splits(writers)
        parts = [p for s in SPLITS for p in writers[s].parts]
        (work / "parts.json").write_text(json.dumps(parts))
        return iter(())

    def _fill_empty_splits(self, writers: dict[str, _PartWriter]) -> None:
        """`split_documents`'s rule for small corpora, on the written parts."""
        wanted = {"train": True, "val": self.val > 0, "test": self.test > 0}
        for s in SPLITS:
            if wanted[s] and not writers[s].documents:
                donor = max(SPLITS, key=lambda k: (writers[k].documents, k == "train"))
                if writers[donor].documents < 2:
                    break  # too few documents; the caller reports it
                src, h, text = writers[donor].remove_smallest()
                writers[s].reopen().write(src, h, text)
                writers[s].close()


class _PartWriter:
    """Writes one split's documents into parts of about `part_chars` characters."""

    def __init__(self, folder: Path, split: str, part_chars: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.split, self.part_chars = folder, split, part_chars
        self.parts: list[dict] = []  # {"split", "name", "documents", "bytes"}
        self.documents, self._f, self._chars = 0, None, 0

    def write(self, src: int, h: str, text: str) -> None:
        if self._f is None or self._chars >= self.part_chars:
            self.close()
            name = f"{self.split}-{len(self.parts):05d}"
            self.parts.append({"split": self.split, "name": name, "documents": 0,
                               "bytes": 0})
            self._f, self._chars = open(self.folder / f"{name}.jsonl", "w",
                                        encoding="utf-8"), 0
        self._f.write(json.dumps([src, h, text]) + "\n")
        self._chars += len(text)
        self.documents += 1
        self.parts[-1]["documents"] += 1
        self.parts[-1]["bytes"] += len(text.encode("utf-8"))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def reopen(self) -> _PartWriter:
        self._chars = self.part_chars  # the next write starts a new part
        return self

    def remove_smallest(self) -> list:
        """Take out the document with the smallest digest (rewriting its part)."""
        best = None
        for part in self.parts:
            for i, (src, h, text) in enumerate(_lines(self.folder / f"{part['name']}.jsonl")):
                if best is None or h < best[2][1]:
                    best = (part, i, [src, h, text])
        part, index, rec = best
        path = self.folder / f"{part['name']}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i, r in enumerate(_lines(path)):
                if i != index:
                    f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
        part["documents"] -= 1
        part["bytes"] -= len(rec[2].encode("utf-8"))
        self.documents -= 1
        return rec


class TokenizePart(PipelineStep):
    """Task `rank` tokenizes split part `parts[rank]` into `<work>/tokens/<name>.bin`:
    each document's ids followed by end-of-text, in order (the `shards.py` format), and
    counts tokens per split and source."""

    name = "tokenize"

    def __init__(self, work: str, parts: list[str], tokenizer_json: str, dtype: str,
                 one_thread: bool):
        super().__init__()
        self.work, self.parts = work, parts
        self.tokenizer_json, self.dtype, self.one_thread = tokenizer_json, dtype, one_thread

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        if self.one_thread:
            # One of prep_workers processes: keep the library's own thread pool out of
            # it, or 2 workers would each start threads for every core.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tok = process_tokenizer(self.tokenizer_json)
        dtype = np.dtype(self.dtype)
        name = self.parts[rank]
        split = name.split("-")[0]
        out = Path(self.work, "tokens", f"{name}.bin")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            for chunk in chunks(_lines(Path(self.work, "split", f"{name}.jsonl")),
                                CHUNK_DOCS, CHUNK_TEXT_CHARS):
                self._encode(chunk, tok, dtype, split, f)
                # The chunk's encodings (Rust, glibc's heap) and id lists are freed,
                # but glibc keeps pages freed below live blocks: without this a worker
                # kept its largest chunk's pages and grew, task after task, with the
                # number of tasks it ran (data/heap.py, `trim_heap`).
                trim_heap()
        return iter(())

    def _encode(self, chunk: list[list], tok: Tokenizer, dtype: np.dtype, split: str,
                f) -> None:
        for (src, _h, _text), ids in zip(chunk, tok.encode_batch([r[2] for r in chunk])):
            ids.append(tok.eot_id)
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            self.stat_update(f"tokens/{split}/src{src}", value=len(ids))
            self.stat_update(length_bin(len(ids)))


def chunks(records: Iterator[list], max_docs: int,
           max_chars: int) -> Iterator[list[list]]:
    """`records` ([source, sha256 hex, text]) in consecutive batches of at most
    `max_docs` documents and `max_chars` characters of text; a document longer than
    `max_chars` is a batch of its own. A batch is closed before the document that would
    overflow it, not after: a batch is then bounded by the limit or by the largest
    document, whatever the part's size (closed after, it held up to `max_chars` plus
    one more document)."""
    batch: list[list] = []
    chars = 0
    for rec in records:
        if batch and (len(batch) >= max_docs or chars + len(rec[2]) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(rec)
        chars += len(rec[2])
    if batch:
        yield batch


@functools.lru_cache(maxsize=1)
def process_tokenizer(tokenizer_json: str) -> Tokenizer:
    """The tokenizer of `tokenizer_json`, built once per worker process and reused by
    every tokenize task the process runs (datatrove's local executor keeps its workers
    for the whole job). Built per task, each `tokenizers.Tokenizer` left ~4 MB behind
    once dropped (tokenizers 0.23.3, measured after gc and malloc_trim: 54 -> 59 -> 63
    -> 67 MB over four 2 MB tasks), so a worker grew with its number of tasks, i.e. with
    the corpus: ~250 MB a worker at 2 GB. One tokenizer stays flat."""
    return Tokenizer.from_str(tokenizer_json)


def length_bin(n_tokens: int) -> str:
    """The stat a document of `n_tokens` tokens (end-of-text included) counts in: bin k
    holds lengths [2**k, 2**(k+1)), so any corpus fits in a few dozen bins summed by
    the executor over the tasks."""
    return f"{LENGTH_STAT}{n_tokens.bit_length() - 1:02d}"


LENGTH_STAT = "length_log2/"
