"""checkpoint/files.py: weight files get the umask's mode; a failed write is one line and
leaves the previous file (issue 13 items 12 and 23), without needing a real full disk."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors import SafetensorError

from scaletrain.checkpoint import files
from scaletrain.errors import CheckpointError
from scaletrain.metrics import write_summary

# What safetensors raised on a really full disk (a tmpfs).
ST_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_weights_and_summary_get_the_umask_mode(tmp_path, umask_027):
    files.save_safetensors({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    write_summary(tmp_path / "summary.json", {"steps": 1})
    for name in ("model.safetensors", "summary.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == umask_027, name
    assert files.umask() == 0o027


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "best.safetensors"
    files.save_safetensors({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError(ST_FULL_DISK)

    monkeypatch.setattr(files, "save_file", full)
    with pytest.raises(CheckpointError) as e:
        files.save_safetensors({"w": torch.zeros(3)}, path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "No space left on device" in msg
    assert "untouched" in msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def test_a_safetensors_bug_stays_internal(tmp_path, monkeypatch):
    def bug(state, filename, metadata=None):
        raise SafetensorError("You are trying to save a non contiguous tensor")

    monkeypatch.setattr(files, "save_file", bug)
    with pytest.raises(SafetensorError):
        files.save_safetensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")
