"""Sources in record formats (JSONL plain / .gz / .zst, Parquet, datasets.save_to_disk):
the same documents give the same prepared bytes as text files; malformed records are
counted; a source with no usable record, or a table without the text column, is one line."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import pytest

from scaletrain.config.schema import DataConfig
from scaletrain.data import shards
from scaletrain.data.prepare import prepare_text
from scaletrain.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NAMES = ["abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py",
         "heapq.py", "keyword.py", "numbers.py", "opcode.py", "shlex.py", "stat.py"]


def texts() -> list[str]:
    return [(STDLIB / n).read_text(encoding="utf-8") for n in NAMES]


def dcfg(src: Path, prepared: Path, **kw) -> DataConfig:
    kw = {"vocab_size": 300, "val_fraction": 0.2, "test_fraction": 0.2, "min_chars": 20,
          "prep_workers": 1, **kw}
    return DataConfig(source=str(src), prepared_dir=str(prepared), **kw)


def bins(path: Path) -> dict[str, bytes]:
    return {s: (path / f"{s}.bin").read_bytes() for s in ("train", "val", "test")}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def text_dir(root: Path) -> Path:
    d = root / "txt"
    d.mkdir()
    for i, t in enumerate(texts()):
        (d / f"{i:02d}.py").write_text(t)
    return d


@pytest.mark.parametrize("fmt", ["corpus.jsonl", "corpus.jsonl.gz", "corpus.jsonl.zst",
                                 "parquet", "saved"])
def test_record_sources_prepare_like_text_files(tmp_path, fmt):
    reference = prepare_text(dcfg(text_dir(tmp_path), tmp_path / "p0"), progress=False)
    rows = [{"text": t, "id": i} for i, t in enumerate(texts())]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        (src := tmp_path / "shards").mkdir()
        # Two shards, sorted by name like text files: the documents keep their order.
        pq.write_table(pa.Table.from_pylist(rows[:5]), src / "part-0.parquet")
        pq.write_table(pa.Table.from_pylist(rows[5:]), src / "part-1.parquet")
    elif fmt == "saved":
        import datasets
        src = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(src))
    else:
        src = write_jsonl(tmp_path / fmt, [json.dumps(r) for r in rows])
    path = prepare_text(dcfg(src, tmp_path / "p"), progress=False)
    m = json.loads((path / "manifest.json").read_text())
    assert bins(path) == bins(reference)
    assert (path / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    assert m["stages"]["records"] == 12 and m["stages"]["documents"] == 12
    assert m["sources"][0]["tokens"]["train"] == m["splits"]["train"]["tokens"]


def test_text_key_and_malformed_records_are_counted(tmp_path):
    good = [json.dumps({"body": t}) for t in texts()]
    bad = ["not json {", json.dumps({"text": "no body"}), json.dumps({"body": 7}),
           json.dumps(["a", "list"]), json.dumps({"body": None})]
    src = write_jsonl(tmp_path / "c.jsonl", good[:6] + bad + good[6:] + [good[0], ""])
    path = prepare_text(dcfg(src, tmp_path / "p", text_key="body"), progress=False)
    m = json.loads((path / "manifest.json").read_text())
    assert m["stages"] == {"records": 18, "malformed": 5, "skipped_binary": 0,
                           "skipped_undecodable": 0, "too_short": 0, "duplicates": 1,
                           "documents": 12}
    assert m["sources"][0]["malformed"] == 5 and m["settings"]["text_key"] == "body"


def test_workers_and_parts_do_not_change_the_output(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"text": t}) for t in texts()])
    a = prepare_text(dcfg(src, tmp_path / "p1"), progress=False)
    monkeypatch.setattr(shards, "CHUNK_CHARS", 3000)  # many parts: many tokenize tasks
    b = prepare_text(dcfg(src, tmp_path / "p2", prep_workers=2), progress=False)
    assert bins(a) == bins(b)
    assert sorted(p.name for p in b.iterdir()) == ["manifest.json", "report.png",
                                                   "test.bin", "tokenizer.json",
                                                   "train.bin", "val.bin"]


def test_tokenizer_trains_on_a_bounded_sample(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"text": t}) for t in texts()])
    full = prepare_text(dcfg(src, tmp_path / "p"), progress=False)
    small = prepare_text(dcfg(src, tmp_path / "p", tokenizer_sample_bytes=5000),
                         progress=False)
    assert full != small  # the sample size is in the key when not the default
    assert (full / "tokenizer.json").read_bytes() != (small / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("case", ["all-malformed", "no-column"])
def test_unusable_record_source_names_file_and_key(tmp_path, case):
    if case == "all-malformed":
        src = write_jsonl(tmp_path / "c.jsonl", ["{oops", json.dumps({"txt": "x" * 50})])
        expect = "c.jsonl: none of its 2 records has a string 'text' field"
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        src = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist([{"content": t} for t in texts()]), src)
        expect = "c.parquet: no column 'text' (data.text_key); its columns are content"
    with pytest.raises(DataError) as e:
        prepare_text(dcfg(src, tmp_path / "p"), progress=False)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
