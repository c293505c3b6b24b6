"""What `scaletrain train` refuses to do to a directory (issue 13 items 9, 10, 11, 16)
and the modes of the files it writes (item 23), through the real CLI."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_DATA, TINY_GPT, one_error_line

UMASK = 0o022  # the usual one: files 0644


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 120):
    """`python -m scaletrain ARGS` in `cwd` under umask 022 (the modes test needs it)."""
    return subprocess.run([sys.executable, "-m", "scaletrain", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)},
                          preexec_fn=lambda: os.umask(UMASK))

pytestmark = pytest.mark.timeout(180)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(prepared_dir, tmp_path_factory):
    """A finished 4-step run (copied per test) and the flags that made it."""
    args = [*TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}", "--train.steps=4",
            "--eval.interval=2", "--train.threads=1"]
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli("train", *args, f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, args


def test_empty_run_dir_is_refused(finished, tmp_path):
    """Item 9: `--run.dir=` would train into the current directory."""
    _, args = finished
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "config.toml").write_text("mine = 1\n")
    (cwd / "summary.json").write_text("{}\n")
    before = snapshot(cwd)
    proc = run_cli("train", *args, "--run.dir=", cwd=cwd)
    one_error_line(proc, "run.dir is empty")
    assert snapshot(cwd) == before


def test_finished_run_without_checkpoints_is_not_restarted(finished, tmp_path):
    """Item 10: a finished run whose checkpoints/ was deleted keeps its outputs."""
    src, args = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    proc = run_cli("train", *args, f"--run.dir={run}")
    one_error_line(proc, str(run), "no checkpoint to resume from", "model.safetensors",
                   "run.overwrite=true")
    assert snapshot(run) == before
    # Asked explicitly: it starts afresh.
    proc = run_cli("train", *args, f"--run.dir={run}", "--run.overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" not in proc.stderr


def test_overwrite_refuses_a_folder_that_is_not_a_run(finished, tmp_path):
    """Item 11: run.overwrite=true on someone's folder deletes nothing."""
    _, args = finished
    folder = tmp_path / "photos"
    for name in ("plots/holiday.png", "checkpoints/step-00000001/notes.txt", "config.toml"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    before = snapshot(folder)
    proc = run_cli("train", *args, f"--run.dir={folder}", "--run.overwrite=true")
    one_error_line(proc, str(folder), "not a scaletrain run", "nothing was deleted")
    assert snapshot(folder) == before


def test_overwrite_of_a_run_removes_only_what_training_wrote(finished, tmp_path):
    """Item 11: in a real run, the user's own files next to the outputs survive."""
    src, args = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "plots" / "my-notes.png").write_bytes(b"mine")
    (run / "README.md").write_text("my run\n")
    old_metrics = (run / "metrics.jsonl").read_text()
    proc = run_cli("train", *args, f"--run.dir={run}", "--run.overwrite=true",
                   "--train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "plots" / "my-notes.png").read_bytes() == b"mine"
    assert (run / "README.md").read_text() == "my run\n"
    assert (run / "metrics.jsonl").read_text() != old_metrics
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]


@pytest.mark.parametrize("where", ["/proc/x", "/proc/self/status/run"])
def test_run_dir_that_cannot_be_created(finished, where):
    """Item 16: a path that cannot be a directory is one line naming it."""
    _, args = finished
    one_error_line(run_cli("train", *args, f"--run.dir={where}"), where)


def test_run_files_respect_the_umask(finished):
    """Item 23: weights and summary.json are as readable as every other run file."""
    run, _ = finished
    modes = {p.relative_to(run).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in run.rglob("*") if p.is_file()}
    want = 0o644  # 0666 & ~UMASK, as open() gives config.toml and metrics.jsonl
    for name in ("model.safetensors", "best.safetensors", "summary.json", "config.toml",
                 "metrics.jsonl"):
        assert modes[name] == want, (name, oct(modes[name]), oct(want))
    assert set(modes.values()) == {want}, {k: oct(v) for k, v in modes.items()}

