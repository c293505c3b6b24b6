"""Data preparation: determinism, the cache, cleaning counts, errors, tokenizer, digits.

Corpora are a few tiny synthetic files in tmp_path and vocabularies are small, so every
test runs in about a second on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from scaletrain.config.schema import Config, DataConfig
from scaletrain.data import shards
from scaletrain.data.build import build_data
from scaletrain.data import tokenizer as tokenizer_mod
from scaletrain.data.cache import verify
from scaletrain.data.clean import Document, split_documents
from scaletrain.data.prepare import prepare, prepare_text
from scaletrain.data.tokenizer import EOT, Tokenizer, train_bpe
from scaletrain.errors import ConfigError, DataError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_corpus(root: Path, n: int = 12) -> Path:
    """n distinct small 'Python' files (each a few hundred characters) under root/src."""
    src = root / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(n):
        lines = [f"def {WORDS[i % 12]}_{i}(x, y={i}):"]
        lines += [f"    {WORDS[(i + j) % 12]} = x * {j} + y  # step {j}" for j in range(8)]
        lines.append(f"    return {WORDS[i % 12]} + 'é中🙂'\n")
        (src / ("pkg" if i % 3 == 0 else "") / f"m{i:02d}.py").write_text("\n".join(lines))
    return src


def dcfg(src: Path, prepared: Path, **kw) -> DataConfig:
    kw = {"vocab_size": 300, "val_fraction": 0.2, "test_fraction": 0.2, "min_chars": 20,
          "prep_workers": 1, **kw}
    return DataConfig(source=str(src), prepared_dir=str(prepared), **kw)


def read_bins(path: Path) -> dict[str, bytes]:
    return {s: (path / f"{s}.bin").read_bytes() for s in ("train", "val", "test")}


def test_prepare_is_deterministic_and_independent_of_workers(tmp_path, monkeypatch):
    src = make_corpus(tmp_path)
    monkeypatch.setattr(shards, "CHUNK_CHARS", 300)  # several chunks, so the pool is used
    a = prepare_text(dcfg(src, tmp_path / "p1", prep_workers=1), progress=False)
    b = prepare_text(dcfg(src, tmp_path / "p2", prep_workers=2), progress=False)
    assert a.name == b.name and a != b
    assert read_bins(a) == read_bins(b)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma == mb
    assert verify(a) == []
    # No temporary directories are left behind.
    assert [p.name for p in (tmp_path / "p1").iterdir()] == [a.name]


def test_token_files_decode_to_the_cleaned_documents(tmp_path):
    src = make_corpus(tmp_path)
    path = prepare_text(dcfg(src, tmp_path / "p"), progress=False)
    m = json.loads((path / "manifest.json").read_text())
    tok = Tokenizer.load(path / "tokenizer.json")
    assert m["dtype"] == "uint16" and m["eot_id"] == tok.eot_id == 0
    assert m["vocab_size"] == tok.vocab_size <= 300
    total_docs = 0
    for s in ("train", "val", "test"):
        ids = np.fromfile(path / f"{s}.bin", dtype="<u2")
        assert ids.size == m["splits"][s]["tokens"] > 0
        assert ids[-1] == tok.eot_id and int((ids == tok.eot_id).sum()) == \
            m["splits"][s]["documents"]
        text = tok.decode(ids.tolist())
        docs = text.split(EOT)[:-1]
        assert all(d.endswith("\n") and d.startswith("def ") for d in docs)
        assert sum(len(d.encode()) for d in docs) == m["splits"][s]["bytes"]
        total_docs += len(docs)
    assert total_docs == m["counts"]["documents"] == 12


def test_second_prepare_is_a_cache_hit(tmp_path, monkeypatch):
    src = make_corpus(tmp_path)
    cfg = dcfg(src, tmp_path / "p")
    first = prepare_text(cfg, progress=False)
    stamp = (first / "manifest.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("cache hit must not train a tokenizer")
    monkeypatch.setattr(tokenizer_mod, "train_bpe", boom)
    assert prepare(cfg, progress=False) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    # prep_workers does not change the output, so it is not part of the key either.
    assert prepare(dcfg(src, tmp_path / "p", prep_workers=2), progress=False) == first


def test_changed_input_or_setting_is_stale(tmp_path):
    src = make_corpus(tmp_path)
    first = prepare_text(dcfg(src, tmp_path / "p"), progress=False)
    f = src / "m01.py"
    f.write_text(f.read_text() + "# edited\n")
    os.utime(f, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    second = prepare_text(dcfg(src, tmp_path / "p"), progress=False)
    third = prepare_text(dcfg(src, tmp_path / "p", vocab_size=320), progress=False)
    assert len({first, second, third}) == 3 and all(p.is_dir() for p in (first, second))
    # A broken cache entry (a .bin of the wrong size) is rebuilt, not trusted.
    (third / "val.bin").write_bytes(b"\0\0")
    assert prepare_text(dcfg(src, tmp_path / "p", vocab_size=320), progress=False) == third
    assert verify(third) == []


def test_cleaning_counts(tmp_path):
    src = make_corpus(tmp_path, n=6)
    body = (src / "m01.py").read_text()
    (src / "copy.py").write_text(body)                                  # exact duplicate
    (src / "crlf.py").write_bytes(body.replace("\n", "\r\n").encode() + b"  \r\n\r\n")
    nfd = unicodedata.normalize("NFD", "def café():\n    return 'é' * 40\n")
    (src / "nfd.py").write_text(nfd)
    (src / "nfc.py").write_text(unicodedata.normalize("NFC", nfd))      # same after NFC
    (src / "short.py").write_text("x = 1\n")                            # < min_chars
    (src / "empty.py").write_text("  \n\n")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 4)   # binary (NUL)
    (src / "latin1.txt").write_bytes("café = 'naïve' " .encode("latin-1") * 4)
    path = prepare_text(dcfg(src, tmp_path / "p"), progress=False)
    counts = json.loads((path / "manifest.json").read_text())["counts"]
    assert counts == {"files": 14, "skipped_binary": 1, "skipped_undecodable": 1,
                      "too_short": 2, "duplicates": 3, "documents": 7}


def test_small_corpus_still_fills_every_split():
    docs = [Document(f"doc {i}\n", bytes([i]) * 32) for i in range(3)]
    out = split_documents(docs, 0.01, 0.01)
    assert sorted(len(v) for v in out.values()) == [1, 1, 1]
    assert split_documents(docs, 0.0, 0.0)["train"] == docs


def _bin_dir(root: Path, n: int) -> Path:
    d = root / "bins"
    d.mkdir()
    for i in range(n):
        (d / f"f{i}.dat").write_bytes(bytes([i, 0, 1, 2]) * 10)
    return d


@pytest.mark.parametrize("case, message", [
    ("missing", "does-not-exist: data source not found"),
    ("empty", "empty: the data directory contains no files"),
    ("binary", "bins: 5 files, all binary or not UTF-8"),
    ("short", "0 document(s) left of 12 files after filtering (12 shorter than "
              "data.min_chars=100000"),
    ("glob", "*.nothing: the pattern matches no files"),
])
def test_data_errors_name_the_source(tmp_path, case, message):
    kw = {}
    if case == "missing":
        src = tmp_path / "does-not-exist"
    elif case == "empty":
        (src := tmp_path / "empty").mkdir()
    elif case == "binary":
        src = _bin_dir(tmp_path, 5)
    elif case == "short":
        src, kw = make_corpus(tmp_path), {"min_chars": 100000}
    else:
        src = tmp_path / "*.nothing"
    with pytest.raises(DataError) as e:
        prepare(dcfg(src, tmp_path / "p", **kw), progress=False)
    msg = str(e.value)
    assert message in msg and "\n" not in msg and str(tmp_path) in msg


def test_fractions_leaving_no_train_split_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        prepare(dcfg(tmp_path, tmp_path / "p", val_fraction=0.6, test_fraction=0.4),
                progress=False)


TRICKY = [
    "", " ", "  leading spaces", "trailing spaces   ", "\ttab\tand\n\n\nnewlines\n",
    "def f():\n    if x:\n        return  y  \n", "é (NFC) vs e\u0301 (NFD)",
    "中文 日本語 한국어 🙂👍🏽 emoji ZWJ 👩‍👩‍👧", "\r\n windows \r line ends",
    "literal <|endoftext|> inside text", "\x00\x01 control \x7f bytes", "ẞ ß ﬁ Ω Ω",
]


def test_tokenizer_round_trip_is_exact(tmp_path):
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 20, "print('hi')\n"], 300)
    tok.save(tmp_path / "tok.json")
    tok = Tokenizer.load(tmp_path / "tok.json")
    for s in TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, s
        assert tok.eot_id not in ids  # the literal string is text, not a boundary
    assert tok.decode([tok.eot_id]) == EOT
    with pytest.raises(DataError, match="nope.json: tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json: not a valid tokenizer file"):
        Tokenizer.load(tmp_path / "bad.json")


def test_glob_source(tmp_path):
    src = make_corpus(tmp_path)
    (src / "notes.txt").write_text("not python, not matched by the pattern " * 3)
    path = prepare_text(dcfg(f"{src}/**/*.py", tmp_path / "p"), progress=False)
    m = json.loads((path / "manifest.json").read_text())
    assert path.name.startswith("src-") and m["counts"]["files"] == 12


def test_python_stdlib_source(tmp_path):
    cfg = Config()
    cfg.data = DataConfig(prepared_dir=str(tmp_path / "p"), max_files=30, vocab_size=512,
                          prep_workers=1)
    cfg.model.seq_len = 32
    data = build_data(cfg, progress=False)
    m = data.manifest
    assert data.kind == "text" and data.path.name.startswith("python-stdlib-")
    assert m["counts"]["files"] == 30 and m["vocab_size"] == data.vocab_size == 512
    assert all(m["splits"][s]["tokens"] > 0 for s in ("train", "val", "test"))
    x, y = data.train.batch(np.arange(4))
    assert x.shape == y.shape == (4, 32) and bool((x[:, 1:] == y[:, :-1]).all())
    cfg.model.seq_len = 10**7
    with pytest.raises(DataError, match=r"train split of .* tokens, fewer than seq_len\+1"):
        build_data(cfg, progress=False)


def test_digits(tmp_path):
    from sklearn.datasets import load_digits
    cfg = Config()
    cfg.data = DataConfig(source="digits", prepared_dir=str(tmp_path / "p"),
                          val_fraction=0.1, test_fraction=0.1)
    data = build_data(cfg, progress=False)
    assert data.kind == "image" and data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert (len(data.train), len(data.val), len(data.test)) == (1437, 180, 180)
    x, y = data.train.x, data.train.y
    assert x.shape == (1437, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-5
    # The statistics are those of the train rows only, not of all images.
    raw = load_digits().images
    z = np.load(data.path / "digits.npz")
    assert sorted(np.concatenate([z["idx_train"], z["idx_val"], z["idx_test"]]).tolist()) \
        == list(range(1797))
    assert np.isclose(data.manifest["mean"], raw[z["idx_train"]].mean())
    assert not np.isclose(data.manifest["mean"], raw.mean(), rtol=0, atol=1e-6)
    xb, yb = data.val.batch(np.array([0, 5]))
    assert xb.shape == (2, 1, 8, 8) and yb.tolist() == z["y_val"][[0, 5]].tolist()
    assert build_data(cfg, progress=False).path == data.path  # cached
