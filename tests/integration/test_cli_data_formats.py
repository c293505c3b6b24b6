"""`scaletrain prepare` on record sources, as a user runs it: the per-stage table, and
the one-line exit 2 for a source whose records have no text field."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np

from tests.conftest import one_error_line, run_cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_prepare_jsonl_prints_stage_counts(tmp_path):
    docs = [(STDLIB / n).read_text() for n in ("abc.py", "bisect.py", "copy.py", "glob.py",
                                                "heapq.py", "shlex.py")]
    lines = [json.dumps({"text": t}) for t in docs] + ["{broken", json.dumps({"text": 3})]
    (src := tmp_path / "dump.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("prepare", f"--data.source={src}", f"--data.prepared_dir={tmp_path}/p",
                   "--data.vocab_size=300", "--data.val_fraction=0.2",
                   "--data.test_fraction=0.2", "--data.prep_workers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "records                    8" in out and "malformed                  2" in out
    assert "documents                  6" in out and f"source {src}: 1 files" in out
    # The table is in pipeline order (manifest.json's keys are sorted).
    assert out.index("records ") < out.index("too_short ") < out.index("duplicates ")
    (prepared,) = (tmp_path / "p").iterdir()
    assert f"report: {prepared / 'report.png'}" in out
    assert (prepared / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The length histogram, against the token files: every document ends with eot.
    m = json.loads((prepared / "manifest.json").read_text())
    lengths = []
    for split in ("train", "val", "test"):
        ids = np.fromfile(prepared / f"{split}.bin", dtype=m["dtype"])
        ends = np.flatnonzero(ids == m["eot_id"])
        lengths += np.diff(np.concatenate([[-1], ends])).tolist()
    assert len(lengths) == 6
    hist = dict(zip(m["lengths"]["lo"], m["lengths"]["documents"]))
    assert hist == {lo: sum(lo <= n < 2 * lo for n in lengths) for lo in hist}
    assert sum(hist.values()) == 6


def test_prepare_jsonl_without_text_field_is_one_line(tmp_path):
    (src := tmp_path / "dump.jsonl").write_text(json.dumps({"content": "x" * 80}) + "\n")
    proc = run_cli("prepare", f"--data.source={src}", f"--data.prepared_dir={tmp_path}/p")
    one_error_line(proc, "dump.jsonl", "'text' field (data.text_key)")
