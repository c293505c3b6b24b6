"""What keeps `prepare`'s memory flat in the corpus size (issue #16, bounded memory):
exact dedup on disk (data/dedup_runs.py), the duplicates a set would find with memory
that does not grow with the number of documents; one tokenizer per worker process,
however many tokenize tasks it runs."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc

import numpy as np

from scaletrain.data.dedup_runs import duplicate_positions
from scaletrain.data.dt_steps import DedupSplit, TokenizePart, process_tokenizer
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
