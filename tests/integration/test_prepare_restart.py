"""A `prepare` killed with SIGKILL midway and started again resumes from datatrove's
completed tasks (it says which, and does not redo them) and writes token files and a
tokenizer byte-identical to an uninterrupted run's, as a user runs it: the CLI, twice
killed (after the read job's first completed task, then inside the tokenize job), then
run to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from tests.conftest import REPO, run_cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
OUTPUTS = ("train.bin", "val.bin", "test.bin", "tokenizer.json")


def write_corpus(folder: Path) -> None:
    """Four JSONL files of stdlib modules (two read tasks each have work)."""
    folder.mkdir()
    mods = sorted(STDLIB.glob("*.py"))[:100]
    for k in range(4):
        with open(folder / f"part{k}.jsonl", "w") as f:
            for p in mods[k::4]:
                f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")


def args(src: Path, prepared: Path) -> list[str]:
    return ["prepare", f"--data.source={src}", f"--data.prepared_dir={prepared}",
            "--data.vocab_size=512", "--data.prep_workers=2"]


def kill_when(cmd: list[str], prepared: Path, marker: str) -> None:
    """Start `scaletrain prepare`, SIGKILL it as soon as a path matching `marker` exists
    under its work directory."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", *cmd], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(prepared.glob(f".work-*/{marker}")):
        assert proc.poll() is None, f"prepare ended (rc {proc.returncode}) before {marker}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the executor's worker processes too
    proc.wait()


def test_killed_prepare_resumes_and_matches(tmp_path):
    write_corpus(src := tmp_path / "src")
    ref = run_cli(*args(src, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    (ref_dir,) = [p for p in (tmp_path / "ref").iterdir()]

    prepared = tmp_path / "p"
    kill_when(args(src, prepared), prepared, "logs-read/completions/*")
    assert not [p for p in prepared.iterdir() if p.name.startswith("src-")]  # unpublished
    kill_when(args(src, prepared), prepared, "logs-tokenize")
    done = run_cli(*args(src, prepared))
    assert done.returncode == 0, done.stderr[-3000:]
    # It resumed: the read and split jobs were done by the killed runs.
    assert "prepare: resuming read: 2 of 2 tasks done before" in done.stderr, done.stderr
    assert "prepare: resuming split: 1 of 1 tasks done before" in done.stderr, done.stderr
    (out,) = [p for p in prepared.iterdir()]  # no work or temporary directory left
    assert out.name == ref_dir.name
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name
    m, m_ref = (json.loads((d / "manifest.json").read_text()) for d in (out, ref_dir))
    assert m["stages"] == m_ref["stages"] and m["lengths"] == m_ref["lengths"]
