"""`data.filters` / `data.filter_args`: datatrove's quality filters inside `prepare`.

The manifest's per-filter counts and the documents left must equal the plain
computation: the same datatrove filter objects applied one document at a time, in one
process, to the cleaned documents in order. Bad names are one line, exit 2, with the near
name, before anything runs.
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest
from datatrove.data import Document
from pydoc_data.topics import topics

from scaletrain.config.schema import DataConfig
from scaletrain.data.clean import normalize_text
from scaletrain.data.filters import FILTERS, check_filters
from scaletrain.data.prepare import prepare_text
from scaletrain.errors import ConfigError, DataError
from tests.conftest import make_cfg, one_error_line, run_cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NAMES = ["c4", "gopher_repetition", "fineweb_quality", "gopher_quality"]
"""In an order where each filter drops some of `corpus()` that the ones before kept."""

PROSE_WORDS = [w for w in " ".join(topics[k] for k in sorted(topics)).split()
               if re.fullmatch(r"[A-Za-z][a-z]*[.,]?", w)]


def prose(i: int) -> str:
    """Document i: 60 + 5i words of the reference documentation's running text, in
    lines of 15 words that end with a full stop."""
    n = 60 + 5 * i
    ws = PROSE_WORDS[i * 300:i * 300 + n]
    return "\n".join(" ".join(ws[j:j + 15]).rstrip(".,") + "."
                     for j in range(0, n, 15)) + "\n"


def corpus() -> list[str]:
    """Prose of many lengths, prose whose lines repeat, code (stdlib modules: few stop
    words, many symbols) and junk, so that every filter has work."""
    code = [(STDLIB / n).read_text() for n in ("abc.py", "bisect.py", "copy.py", "glob.py",
                                                "heapq.py", "shlex.py", "this.py")]
    junk = [("buy now " * 40 + "\n") * (i + 2) for i in range(5)]
    junk += ["\n".join(f"line {i} {j}" for j in range(60)) for i in range(5)]
    return [prose(i) for i in range(40)] + [prose(i) * 3 for i in range(40, 45)] + \
        code + junk


def plain(texts: list[str], names: list[str], args: dict, min_chars: int = 32):
    """Per-filter drops and the surviving texts, one document at a time."""
    filters = [FILTERS[n](**args.get(n, {})) for n in names]
    dropped, kept = {n: 0 for n in names}, []
    for t in texts:
        text = normalize_text(t)
        if not text or len(text) - 1 < min_chars:
            continue
        doc = Document(text=text, id="x")
        for n, f in zip(names, filters):
            result = f.filter(doc)
            if not (result[0] if isinstance(result, tuple) else result):
                dropped[n] += 1
                break
        else:
            kept.append(doc.text)
    return dropped, kept


@pytest.mark.parametrize("args", [{}, {"gopher_quality": {"min_doc_words": 100}}],
                         ids=["defaults", "filter_args"])
def test_filter_counts_match_the_plain_computation(tmp_path, args):
    texts = corpus()
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(source=str(tmp_path / "c.jsonl"), prepared_dir=str(tmp_path / "p"),
                     vocab_size=300, prep_workers=2, filters=NAMES, filter_args=args)
    m = json.loads((prepare_text(cfg, progress=False) / "manifest.json").read_text())
    dropped, kept = plain(texts, NAMES, args)
    assert {n: m["stages"][f"dropped_{n}"] for n in NAMES} == dropped
    assert all(dropped.values()), dropped  # every filter is exercised
    assert m["stages"]["documents"] == len(set(kept))
    assert m["stage_order"][5:9] == [f"dropped_{n}" for n in NAMES]  # pipeline order
    assert m["settings"]["filters"] == NAMES


def test_check_filters_names_the_near_name():
    with pytest.raises(DataError, match="unknown filter 'gopher_qualty'.*'gopher_quality'"):
        check_filters(["gopher_qualty"], {})
    with pytest.raises(DataError, match="min_doc_word: not an argument.*'min_doc_words'"):
        check_filters(["gopher_quality"], {"gopher_quality": {"min_doc_word": 3}})
    with pytest.raises(DataError, match="'c4' is not in data.filters"):
        check_filters(["gopher_quality"], {"c4": {}})
    assert check_filters(["gopher_repetition"], {"gopher_repetition": {
        "top_n_grams": [[2, 0.3]]}}) == [("gopher_repetition", {"top_n_grams": ((2, 0.3),)})]


def test_unknown_filter_is_one_line_exit_2(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x" * 100}) + "\n")
    proc = run_cli("prepare", f"--data.source={tmp_path}/c.jsonl",
                   f"--data.prepared_dir={tmp_path}/p", "--data.filters=c4,finweb_quality")
    one_error_line(proc, "data.filters", "'finweb_quality'", "'fineweb_quality'")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_filter_args_from_the_command_line_is_an_inline_table():
    cfg = make_cfg(["--data.filters=gopher_quality,c4",
                    "--data.filter_args={gopher_quality = {min_doc_words = 20}}"])
    assert cfg.data.filters == ["gopher_quality", "c4"]
    assert check_filters(cfg.data.filters, cfg.data.filter_args) == [
        ("gopher_quality", {"min_doc_words": 20}), ("c4", {})]
    with pytest.raises(ConfigError, match="data.filter_args: expected an inline TOML table"):
        make_cfg(["--data.filter_args=min_doc_words=20"])
