"""Config path fields are absolute once built, so a saved config means the same from any
directory (issue 13 item 7); names and empty values are left alone."""

from __future__ import annotations

import os

from scaletrain.config import build_config
from scaletrain.data.sources import slug


def test_path_fields_are_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config(None, [("data.source", "corpus/**/*.txt"),
                              ("data.prepared_dir", "cache"), ("init.from", "runs/base"),
                              ("data.tokenizer", "~/tok.json"), ("run.dir", "runs/x")])
    assert cfg.data.source == f"{tmp_path}/corpus/**/*.txt"  # still a pattern
    assert cfg.data.prepared_dir == f"{tmp_path}/cache"
    assert cfg.init.from_ == f"{tmp_path}/runs/base"
    assert cfg.data.tokenizer == os.path.expanduser("~/tok.json")
    assert cfg.run.dir == "runs/x"  # the run's own place: given to every command anyway
    plain = build_config(None, [])
    assert plain.data.source == "python-stdlib" and plain.data.tokenizer == ""
    assert plain.checkpoint.resume == "auto" and plain.distill.teacher == ""


def test_cache_name_is_the_same_for_relative_and_absolute_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ("*.txt", ".", "corpus/", "corpus/**/*.md"):
        assert slug(rel) == slug(os.path.abspath(rel)), rel


def test_resume_check_reads_an_old_relative_source_as_today(tmp_path, monkeypatch):
    """A checkpoint saved before paths were absolute holds `corpus/`; the same flag now
    builds `<cwd>/corpus`: not a change of data."""
    from scaletrain.checkpoint.compat import differences
    from scaletrain.config import to_dict

    monkeypatch.chdir(tmp_path)
    now = to_dict(build_config(None, [("data.source", "corpus/")]))
    saved = {**now, "data": {**now["data"], "source": "corpus/"}}
    assert differences(saved, now) == []
    saved["data"]["source"] = "other/"
    assert differences(saved, now) == [f"data.source: 'other/' -> '{tmp_path}/corpus'"]
