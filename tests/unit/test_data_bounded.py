"""What keeps `prepare`'s memory flat in the corpus size (issue #16, bounded memory):
exact dedup on disk (data/dedup_runs.py), the duplicates a set would find with memory
that does not grow with the number of documents; one tokenizer per worker process,
however many tokenize tasks it runs; a tokenize task's batches bounded in characters
whatever its part's size, with the heap trimmed after each."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc

import numpy as np

from scaletrain.data import dt_steps
from scaletrain.data.dedup_runs import duplicate_positions
from scaletrain.data.dt_steps import DedupSplit, TokenizePart, chunks, process_tokenizer
from scaletrain.data.tokenizer import Tokenizer, train_bpe


def _set_duplicates(digests: list[bytes]) -> list[int]:
    """The plain computation: positions whose digest a set has already seen."""
    seen, out = set(), []
    for i, d in enumerate(digests):
        if d in seen:
            out.append(i)
        seen.add(d)
    return out


def test_duplicate_positions_equal_a_set(tmp_path):
    rng = random.Random(0)
    # 5000 items drawn from 3000 texts: many repeats, some 3+ times, in random places.
    digests = [hashlib.sha256(str(rng.randrange(3000)).encode()).digest()
               for _ in range(5000)]
    # Runs of 97 and fan-in 3: 52 runs, merged in several rounds.
    got = list(duplicate_positions(iter(digests), tmp_path / "d", run_records=97, fan_in=3))
    assert got == _set_duplicates(digests)
    assert not (tmp_path / "d").exists()  # its run files are removed
    assert list(duplicate_positions(iter([]), tmp_path / "e")) == []


def _work(tmp_path, n_docs: int):
    """A work directory whose cleaned shard holds `n_docs` short documents, every 10th a
    copy of the one before it, in (file, record) order."""
    work = tmp_path / f"w{n_docs}"
    (work / "clean").mkdir(parents=True)
    with open(work / "clean" / "00000.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = f"document {i - (i % 10 == 9)}\n"
            h = hashlib.sha256(text.encode()).hexdigest()
            f.write(json.dumps([i, 0, 0, h, text]) + "\n")
    return work


def _peak_bytes(work) -> tuple[int, int]:
    """Peak traced memory of the dedup + split task over `work`, and its duplicates;
    runs of 256 records merged 4 at a time: 8 runs for 2000 documents, 79 for 20000,
    so both go through merge rounds."""
    step = DedupSplit(str(work), 0.1, 0.1, 1 << 30, run_records=256, fan_in=4)
    tracemalloc.start()
    try:
        step.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, step.stats["duplicates"].total


def test_dedup_split_memory_does_not_grow_with_documents(tmp_path):
    # Python allocations only (tracemalloc). A set of digests (the code before) grew
    # by ~80 bytes per extra document here (328 KB -> 1.76 MB); the sorted runs hold
    # 256 records and 4 read buffers whatever the count (141 -> 233 KB: the buffers
    # fill up in the larger merges, a constant). Under 16 bytes per extra document,
    # half a digest, no structure can keep anything per document.
    small, dups_small = _peak_bytes(_work(tmp_path, 2000))
    large, dups_large = _peak_bytes(_work(tmp_path, 20000))
    assert (dups_small, dups_large) == (200, 2000)
    assert large - small < 16 * (20000 - 2000), (small, large)


def test_tokenize_tasks_of_a_process_share_one_tokenizer(tmp_path, monkeypatch):
    # A tokenizers.Tokenizer built per task left ~4 MB behind once dropped, so a worker
    # grew with the number of tasks it ran (dt_steps.process_tokenizer); count builds.
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(30)]
    tok = train_bpe(iter(texts), 300)
    names = [f"train-{i:05d}" for i in range(3)]
    (tmp_path / "split").mkdir()
    for i, name in enumerate(names):
        with open(tmp_path / "split" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for t in texts[i::3]:
                f.write(json.dumps([0, hashlib.sha256(t.encode()).hexdigest(), t]) + "\n")
    built = []
    real = Tokenizer.from_str.__func__
    monkeypatch.setattr(Tokenizer, "from_str",
                        classmethod(lambda cls, s: built.append(1) or real(cls, s)))
    process_tokenizer.cache_clear()
    step = TokenizePart(str(tmp_path), names, tok.to_str(), "<u2", one_thread=False)
    for rank in range(3):  # three tasks in this one process, as a reused worker runs them
        step.run(rank=rank, world_size=3)
    assert len(built) == 1
    for i, name in enumerate(names):  # and each part is still its documents' ids + eot
        want = [t for doc in texts[i::3] for t in tok.encode(doc) + [tok.eot_id]]
        got = np.fromfile(tmp_path / "tokens" / f"{name}.bin", dtype="<u2").tolist()
        assert got == want


def _split_part(work, name: str, texts: list[str]) -> None:
    (work / "split").mkdir(parents=True, exist_ok=True)
    with open(work / "split" / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps([0, hashlib.sha256(t.encode()).hexdigest(), t]) + "\n")


def test_batches_close_before_they_overflow():
    # Sizes around the limit of 100 characters: a batch never passes it unless it is one
    # document longer than the limit, and the batches are the records, in order.
    sizes = [30, 60, 20, 99, 1, 100, 250, 5, 95, 40, 40, 40, 3, 101]
    records = [[0, "h", "x" * n] for n in sizes]
    batches = list(chunks(iter(records), max_docs=3, max_chars=100))
    assert [r for b in batches for r in b] == records
    for b in batches:
        chars = sum(len(r[2]) for r in b)
        assert len(b) <= 3 and (chars <= 100 or len(b) == 1), [len(r[2]) for r in b]
    assert [[len(r[2]) for r in b] for b in batches] == [
        [30, 60], [20], [99, 1], [100], [250], [5, 95], [40, 40], [40, 3], [101]]
    assert list(chunks(iter([]), 3, 100)) == []


def test_tokenize_task_memory_does_not_grow_with_its_part(tmp_path, monkeypatch):
    # One tokenize task over a part of 40 documents and over one of 400 (the same
    # documents 10 times), batches of at most 2000 characters: the Python memory it
    # peaks at (id lists, the batch, its texts) is one batch's, not the part's: 56.5 vs
    # 57.7 KB. Batches bounded by the 256 documents only: 104 vs 678 KB. Under 40 KB, or
    # ~110 bytes per extra document, nothing can be kept per document or per token.
    texts = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n" * (1 + i % 7) for i in range(40)]
    tok = train_bpe(iter(texts), 300)
    _split_part(tmp_path, "train-00000", texts)
    _split_part(tmp_path, "train-00001", texts * 10)
    monkeypatch.setattr(dt_steps, "CHUNK_TEXT_CHARS", 2000)
    process_tokenizer.cache_clear()
    step = TokenizePart(str(tmp_path), ["train-00000", "train-00001"], tok.to_str(), "<u2",
                        one_thread=False)
    step.run(rank=0, world_size=2)  # builds the process's tokenizer outside the traces
    peaks = []
    for rank in (0, 1):
        tracemalloc.start()
        try:
            step.run(rank=rank, world_size=2)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    small, large = peaks
    assert large - small < 40_000, (small, large)
    ids = np.fromfile(tmp_path / "tokens" / "train-00001.bin", dtype="<u2").tolist()
    assert ids == [t for doc in texts * 10 for t in tok.encode(doc) + [tok.eot_id]]


def test_tokenize_trims_the_heap_after_every_batch(tmp_path, monkeypatch):
    # glibc keeps the pages of a freed batch when live blocks sit above them, so a worker
    # that runs many tasks grows with their number unless each batch ends in
    # malloc_trim (data/heap.py's trim_heap): encode, trim, encode, trim, ...
    texts = [f"text {i:02d} " * 40 for i in range(12)]  # 12 texts of one length
    tok = train_bpe(iter(texts), 300)
    _split_part(tmp_path, "val-00000", texts)
    events = []
    real_encode = TokenizePart._encode
    monkeypatch.setattr(TokenizePart, "_encode", lambda self, chunk, *a: (
        events.append(("encode", len(chunk))), real_encode(self, chunk, *a))[1])
    monkeypatch.setattr(dt_steps, "trim_heap", lambda: events.append(("trim",)))
    monkeypatch.setattr(dt_steps, "CHUNK_TEXT_CHARS", 4 * len(texts[0]))
    process_tokenizer.cache_clear()
    TokenizePart(str(tmp_path), ["val-00000"], tok.to_str(), "<u2",
                 one_thread=False).run(rank=0, world_size=1)
    assert events == [("encode", 4), ("trim",)] * 3
