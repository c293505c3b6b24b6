"""Checkpoints across layouts (issue #5, item 6): DCP reshards on load, so a run saved
with dp_shard=2 resumes on 1 process or on DDP 2 — and a 1-process checkpoint resumes
with dp_shard=2 or pp=2 — and the resumed steps' losses match the uninterrupted
2-process run to 1e-6 relative. Runs the real CLI (torchrun for 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import ROOT, TINY, prepared  # noqa: F401 - module fixture

RUN = [*TINY, "--train.steps=20", "--eval.interval=0", "--eval.test=false",
       "--checkpoint.interval=5", "--checkpoint.keep=4"]


def train(args: list[str], run: Path, nproc: int = 1) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "scaletrain", "train", *RUN, *args, f"--run.dir={run}"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def test_resume_across_layouts(prepared, tmp_path):  # noqa: F811
    data = f"--data.prepared_dir={prepared}"
    full = tmp_path / "fsdp2"
    train([data, "--parallel.dp_replicate=1", "--parallel.dp_shard=2"], full, nproc=2)
    ref = losses(full)
    assert sorted(ref) == list(range(1, 21))
    step10 = full / "checkpoints" / "step-00000010"
    cases = [  # (layout args, nproc, checkpoint resumed from, first resumed step)
        (["--parallel.dp_shard=1"], 1, step10, 11),
        (["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], 2, step10, 11),
    ]

    def resume_matches(layout, ckpt, run, nproc, first, label):
        """Resume `ckpt` with `layout`; steps first..20 must match the reference run."""
        train([data, *layout, f"--checkpoint.resume={ckpt}"], run, nproc)
        got = losses(run)
        assert sorted(got) == list(range(first, 21)), f"{label}: steps {sorted(got)}"
        for s in got:
            assert got[s] == pytest.approx(ref[s], rel=1e-6), f"{label}, step {s}"

    for i, (layout, nproc, ckpt, first) in enumerate(cases):
        resume_matches(layout, ckpt, tmp_path / f"resume{i}", nproc, first, f"case {i}")
    # Vice versa: the 1-process resumed run saved step 15; continue it with dp_shard=2.
    ckpt15 = tmp_path / "resume0" / "checkpoints" / "step-00000015"
    resume_matches(["--parallel.dp_replicate=1", "--parallel.dp_shard=2"], ckpt15,
                   tmp_path / "resume_back", 2, 16, "vice versa")
    # ... and into a pipeline (issue #6): its last stage's tied head copy has no optimizer
    # entries in a 1-process checkpoint and reads the embedding's.
    resume_matches(["--parallel.pp=2", "--parallel.dp_shard=1"], ckpt15,
                   tmp_path / "resume_pp", 2, 16, "1-proc -> pp=2")
