"""Split parts spread a corpus over `data.prep_workers` (issue 16: a corpus under
`shards.CHUNK_CHARS` was one train part, tokenized by one worker), and the token files
do not depend on how many parts there are."""

from __future__ import annotations

from scaletrain.data import pipeline, shards
from scaletrain.data.prepare import prepare_text
from tests.unit.test_data import dcfg, make_corpus, read_bins


def test_split_part_chars_gives_two_parts_per_worker(tmp_path, monkeypatch):
    (tmp_path / "00000.jsonl").write_bytes(b"x" * 3000)
    (tmp_path / "00001.jsonl").write_bytes(b"y" * 1000)
    (tmp_path / "ignored.txt").write_bytes(b"z" * 10**6)  # not a cleaned shard
    monkeypatch.setattr(pipeline, "MIN_PART_CHARS", 100)
    assert pipeline.split_part_chars(tmp_path, 1) == shards.CHUNK_CHARS  # one worker: as before
    assert pipeline.split_part_chars(tmp_path, 2) == 1000  # 4000 bytes / (2 x 2 workers)
    assert pipeline.split_part_chars(tmp_path, 3) == 667  # rounded up: never 2w + 1 parts
    monkeypatch.setattr(pipeline, "MIN_PART_CHARS", 2000)
    assert pipeline.split_part_chars(tmp_path, 2) == 2000  # a floor for tiny corpora
    monkeypatch.setattr(shards, "CHUNK_CHARS", 500)
    assert pipeline.split_part_chars(tmp_path, 2) == 500  # and CHUNK_CHARS still a ceiling


def test_small_corpus_is_tokenized_in_several_tasks_same_bytes(tmp_path, monkeypatch):
    src = make_corpus(tmp_path, n=24)
    one = prepare_text(dcfg(src, tmp_path / "p1", prep_workers=1), progress=False)
    seen = {}
    job = pipeline._job

    def spy(steps, **kw):  # pipeline passes tasks=, workers=, logs=, dcfg=
        seen[kw["logs"].name] = kw["tasks"]
        return job(steps, **kw)

    monkeypatch.setattr(pipeline, "_job", spy)
    monkeypatch.setattr(pipeline, "MIN_PART_CHARS", 100)  # the corpus is ~8 kB
    two = prepare_text(dcfg(src, tmp_path / "p2", prep_workers=2), progress=False)
    # CHUNK_CHARS (16M) would give one part per split: 3 tokenize tasks; the train
    # split (60%) in parts of ~1/4 of the corpus gives 2 or 3.
    assert seen["logs-tokenize"] >= 4
    assert read_bins(two) == read_bins(one)
    assert (two / "manifest.json").read_text() == (one / "manifest.json").read_text()
