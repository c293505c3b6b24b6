"""A really full disk (a small tmpfs) during a checkpoint save and while writing
best.safetensors: one line, exit 2, and the previous checkpoint resumes bitwise (issue
13 item 12). Mounting needs root (CAP_SYS_ADMIN); without it these tests skip, and
tests/unit/test_checkpoint.py + tests/unit/test_weight_files.py cover the same errors
by raising them where the disk would."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_DATA, TINY_GPT, run_cli
from tests.integration.test_resume import assert_same_weights, one_error_line, records

pytestmark = pytest.mark.timeout(240)


def mount_tmpfs(where: Path, size_bytes: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of `size` bytes; always unmounted after the test."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        mount_tmpfs(where, size_bytes)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)])  # busy: detach now, free later


def tree_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def test_full_disk_during_a_checkpoint_save_then_resume_is_bitwise(prepared_dir, tmp_path,
                                                                   small_disk):
    args = [*TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}", "--train.steps=10",
            "--checkpoint.interval=5", "--eval.interval=5", "--eval.test=false",
            "--train.threads=1", "--model.dropout=0.1"]
    ref = tmp_path / "ref"
    proc = run_cli("train", *args, f"--run.dir={ref}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_ckpt = tree_bytes(ref / "checkpoints" / "step-00000010")

    # The run's checkpoints on a disk with room for one and a half checkpoints: step 5
    # fits, step 10 fills it up.
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(small_disk(one_ckpt * 3 // 2), target_is_directory=True)
    proc = run_cli("train", *args, f"--run.dir={run}")
    one_error_line(proc, "saving checkpoint", "step-00000010", "No space left on device",
                   "step-00000005) is untouched")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000005"]

    # The same command on a disk with room: resumes from step 5, bitwise as if never stopped.
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)  # follows the symlink: the checkpoint itself is copied
    proc = run_cli("train", *args, f"--run.dir={moved}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000005" in proc.stderr
    assert records(moved) == records(ref)
    assert_same_weights(ref / "model.safetensors", moved / "model.safetensors")


def test_full_disk_writing_best_weights_is_one_line(prepared_dir, tmp_path, small_disk):
    """The step-0 evaluation writes best.safetensors (~160 KB) onto a 100 KB disk."""
    disk = small_disk(100 * 1024)
    run = disk / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=4", "--eval.interval=2", f"--run.dir={run}")
    one_error_line(proc, f"writing {run / 'best.safetensors'} failed",
                   "No space left on device")
    assert not (run / "best.safetensors").exists()
    assert not (run / "best.safetensors.tmp").exists()  # the partial file is removed


def test_full_disk_keeps_the_previous_weights_file(tmp_path, small_disk):
    from scaletrain.checkpoint.files import save_safetensors
    from scaletrain.errors import CheckpointError

    disk = small_disk(64 * 1024)
    path = disk / "best.safetensors"
    save_safetensors({"w": torch.zeros(16)}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="No space left on device.*untouched"):
        save_safetensors({"w": torch.zeros(100_000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["best.safetensors"]
