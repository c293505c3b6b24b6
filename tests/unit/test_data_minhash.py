"""`data.dedup = "minhash"`: datatrove's MinHash stages in the preparation pipeline.

A corpus of English prose (Python's own reference documentation, cut into windows of
250 words) where 20% of the documents are planted near-duplicates of others (3 words
replaced): MinHash must remove >= 90% of the planted copies and <= 1% of the originals,
and it must keep the first copy (the original, earlier in the sources' order). Which
documents survived is read back from the token files themselves (decoded), not from a
count the pipeline reports about itself.
"""

from __future__ import annotations

import json
import random

import numpy as np
from pydoc_data.topics import topics

from scaletrain.config.schema import DataConfig
from scaletrain.data.prepare import prepare_text
from scaletrain.data.tokenizer import Tokenizer

WORDS = 250


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = text.split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def prose_documents() -> list[str]:
    """Non-overlapping 250-word windows of the reference documentation, one line each
    (a document's text as the cleaning leaves it). The documentation repeats itself
    (the "try" and "except" topics share paragraphs): a window with a 5-gram Jaccard
    similarity >= 0.3 to an earlier one is left out, so that the originals are
    distinct and every near-duplicate is a planted one."""
    words = "\n\n".join(topics[k] for k in sorted(topics)).split()
    docs, kept = [], []
    for i in range(0, len(words) - WORDS + 1, WORDS):
        text = " ".join(words[i:i + WORDS]) + "\n"
        sh = shingles(text)
        if all(jaccard(sh, k) < 0.3 for k in kept):
            docs.append(text)
            kept.append(sh)
    return docs


def near_copy(text: str, rng: random.Random, changes: int = 3) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), changes):
        words[i] = rng.choice(["banana", "lighthouse", "velvet", "quartz", "meadow"])
    return " ".join(words) + "\n"


def surviving_texts(prepared) -> set[str]:
    """The documents in the token files, decoded (each ends with end-of-text)."""
    m = json.loads((prepared / "manifest.json").read_text())
    tok = Tokenizer.load(prepared / "tokenizer.json")
    out = set()
    for split in ("train", "val", "test"):
        ids = np.fromfile(prepared / f"{split}.bin", dtype=m["dtype"]).tolist()
        start = 0
        for i, t in enumerate(ids):
            if t == tok.eot_id:
                out.add(tok.decode(ids[start:i]))
                start = i + 1
    return out


def test_minhash_removes_planted_near_duplicates(tmp_path):
    rng = random.Random(0)
    originals = prose_documents()
    copied = rng.sample(range(len(originals)), len(originals) // 4)  # 20% of the corpus
    copies = [near_copy(originals[i], rng) for i in copied]
    # Two files: the copies come later in the sources' order, so the originals are the
    # first copies, the ones to keep.
    for name, docs in (("a-originals.jsonl", originals), ("b-copies.jsonl", copies)):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = DataConfig(source=str(tmp_path / "src"), prepared_dir=str(tmp_path / "p"),
                     vocab_size=400, prep_workers=2, dedup="minhash")
    prepared = prepare_text(cfg, progress=False)
    kept = surviving_texts(prepared)
    removed_copies = sum(c not in kept for c in copies) / len(copies)
    removed_originals = sum(o not in kept for o in originals) / len(originals)
    assert len(copies) / (len(copies) + len(originals)) >= 0.19
    assert removed_copies >= 0.9, removed_copies
    assert removed_originals <= 0.01, removed_originals
    stages = json.loads((prepared / "manifest.json").read_text())["stages"]
    assert stages["near_duplicates"] == len(originals) + len(copies) - len(kept)
    assert stages["documents"] == len(kept)


def test_exact_dedup_keeps_near_duplicates(tmp_path):
    """The control: the default exact dedup removes none of the planted copies, so the
    removals above are MinHash's."""
    rng = random.Random(0)
    originals = prose_documents()[:40]
    copies = [near_copy(t, rng) for t in originals[:10]]
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in originals + copies))
    cfg = DataConfig(source=str(tmp_path / "c.jsonl"), prepared_dir=str(tmp_path / "p"),
                     vocab_size=300, prep_workers=1)
    kept = surviving_texts(prepare_text(cfg, progress=False))
    assert all(c in kept for c in copies) and all(o in kept for o in originals)
