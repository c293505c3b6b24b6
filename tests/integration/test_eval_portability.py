"""A run's reported test loss is `scaletrain eval --split test`'s, and a run directory
stays usable when moved and from any working directory (issue 13 items 5 and 7).

Training runs through the CLI in a working directory of its own, with relative
`--data.prepared_dir` and `--run.dir`, as a user types them; `eval` then runs from a
directory at another depth, where those relative paths would name other places.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaletrain.cli import main
from tests.conftest import REPO, TINY_DATA, TINY_GPT

pytestmark = pytest.mark.timeout(240)
# Large evaluation batches: the whole test split (~4,000 windows) in a few forwards.
ARGS = [*TINY_DATA, *TINY_GPT, "--eval.batch_size=128", "--eval.test_batches=0",
        "--train.threads=1",
        "--data.prepared_dir=../prep"]


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "scaletrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=200)


def _eval(capsys, run_dir: Path, split: str, *extra: str) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: one thread is faster for a tiny model
    try:
        assert main(["eval", str(run_dir), "--split", split, *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def work(prepared_dir, tmp_path_factory) -> Path:
    """tmp/work/base: a tiny run trained from tmp/work on a private copy of the prepared
    corpus at tmp/prep, both named by relative paths."""
    root = tmp_path_factory.mktemp("portable")
    shutil.copytree(prepared_dir, root / "prep")  # the cache key does not include its place
    (root / "work").mkdir()
    proc = _cli(root / "work", "train", *ARGS, "--run.dir=base", "--train.steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_reported_test_loss_is_eval_of_the_whole_test_split(work, capsys):
    base = work / "work" / "base"
    summary = json.loads((base / "summary.json").read_text())
    result = _eval(capsys, base, "test")
    assert summary["test"]["loss"] == pytest.approx(result["loss"], rel=1e-6)
    # eval.batches=2 of 128 samples; the test split is larger.
    assert summary["test"]["samples"] == result["samples"] > 2 * 128
    assert summary["val"]["samples"] == 2 * 128  # validation: the configured sample, said so
    # A run that sets eval.test_batches reports that part; eval reads the same part.
    assert _eval(capsys, base, "test", "--eval.test_batches=3")["samples"] == 3 * 128
    done = [r for r in map(json.loads, (base / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "eval" and r["split"] == "test"]
    assert done[-1]["loss"] == summary["test"]["loss"]


def test_moved_finetune_and_base_evaluate_from_another_directory(work, capsys, monkeypatch):
    no_shape = [a for a in ARGS if not a.startswith("--model.")]  # from init.from
    proc = _cli(work / "work", "train", *no_shape, "--init.from=base", "--run.dir=ft",
                "--train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {n: json.loads((work / "work" / n / "summary.json").read_text())["test"]["loss"]
              for n in ("base", "ft")}
    caches = sorted(p.name for p in (work / "prep").iterdir())

    moved = work / "elsewhere" / "runs"
    moved.mkdir(parents=True)
    for n in ("base", "ft"):  # the base moves too: the fine-tune must not need it
        shutil.move(work / "work" / n, moved / n)
    other = work / "a" / "b" / "c"  # "../prep" from here is a/b/prep: not the cache
    other.mkdir(parents=True)
    monkeypatch.chdir(other)
    for n in ("ft", "base"):
        assert _eval(capsys, moved / n, "test")["loss"] == pytest.approx(before[n], rel=1e-6)
    assert sorted(p.name for p in (work / "prep").iterdir()) == caches  # nothing prepared
    assert not any(other.iterdir()) and not (work / "a" / "b" / "prep").exists()
    saved = (moved / "ft" / "config.toml").read_text()
    assert f'prepared_dir = "{work / "prep"}"' in saved


def test_finetune_resumes_after_its_base_is_deleted(work):
    # item 7: a resume reads the run's own config and checkpoint, never init.from.
    no_shape = [a for a in ARGS if not a.startswith("--model.")]  # from init.from
    ft = [*no_shape, "--schedule.name=constant", "--checkpoint.interval=2"]
    # A base of its own: the test above moves `base` away.
    proc = _cli(work / "work", "train", *ARGS, "--run.dir=base7", "--train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(work / "work" / "base7", work / "work" / "doomed")
    proc = _cli(work / "work", "train", *ft, "--init.from=doomed", "--run.dir=cut",
                "--train.steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(work / "work" / "doomed")
    proc = _cli(work / "work", "train", *ft, "--run.dir=cut", "--train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli(work / "work", "train", *ft, "--init.from=base7", "--run.dir=whole",
                "--train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]

    def train_losses(name):
        lines = (work / "work" / name / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]

    assert train_losses("cut") == train_losses("whole") and len(train_losses("cut")) == 6
    cut, whole = (load_file(work / "work" / n / "model.safetensors") for n in ("cut", "whole"))
    assert cut.keys() == whole.keys()
    assert all(torch.equal(cut[k], whole[k]) for k in cut)
