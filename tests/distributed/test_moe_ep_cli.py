"""Expert parallelism the way users run it: `scaletrain train --nproc 2 --parallel.ep=2`
on an MoE llama (sigmoid_bias router, aux loss) matches the one-process run to 1e-6
relative (also with selective activation checkpointing, and EP=2 × TP=2 on 4), and
checkpoints cross EP degrees — EP=2 (and EP=2 × TP=2) -> one process and one process ->
EP=2 (EP=2 × TP=2) — with the losses of the uninterrupted run (DCP reshards the
experts' (E, D, F) DTensors). Bad EP layouts end with one line and exit code 2 before torchrun starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_cli
from test_cli import ROOT, TINY

prepared = test_cli.prepared  # the module fixture: the tiny corpus, prepared once

MOE = ["--model.name=llama", "--model.moe_experts=4", "--model.moe_top_k=2",
       "--model.moe_d_ff=16", "--model.moe_router=sigmoid_bias",
       "--model.moe_bias_update_rate=0.01", "--model.moe_aux_loss=0.01"]
RUN = [*TINY, *MOE, "--train.steps=10", "--eval.interval=0", "--eval.test=false",
       "--checkpoint.interval=5", "--checkpoint.keep=4"]
EP2 = ["--parallel.dp_shard=2", "--parallel.ep=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def scaletrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaletrain", *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def train(args: list[str], run: Path, nproc: int = 1) -> dict[int, float]:
    nproc_args = ["--nproc", str(nproc)] if nproc > 1 else []
    proc = scaletrain("train", *RUN, *args, f"--run.dir={run}", *nproc_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.fixture(scope="module")
def one(prepared, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The one-process run (its directory: step 5's checkpoint, and its losses)."""
    run = tmp_path_factory.mktemp("moe-ep-cli") / "one"
    return run, train([f"--data.prepared_dir={prepared}", "--parallel.dp_shard=1"], run)


# Four CLI runs (two through torchrun): past the default 300 s at a load average of 15
# on the 2 shared cores.
@pytest.mark.timeout(600)
def test_ep_cli_matches_one_process_and_resumes_across_ep(prepared, one, tmp_path):
    data = f"--data.prepared_dir={prepared}"
    one_dir, one = one
    ep2 = train([data, *EP2], tmp_path / "ep2", nproc=2)
    assert sorted(one) == sorted(ep2) == list(range(1, 11))
    for s in one:
        assert ep2[s] == pytest.approx(one[s], rel=1e-6), f"EP=2 step {s}"
    par = json.loads((tmp_path / "ep2" / "summary.json").read_text())["parallel"]
    assert (par["strategy"], par["dp_shard"], par["ep"]) == ("fsdp+ep", 2, 2)
    cases = [  # (layout, nproc, checkpoint) -> steps 6..10 of the uninterrupted run
        (["--parallel.dp_shard=1"], 1, tmp_path / "ep2" / "checkpoints" / "step-00000005"),
        (EP2, 2, one_dir / "checkpoints" / "step-00000005")]
    for i, (layout, nproc, ckpt) in enumerate(cases):
        got = train([data, *layout, f"--checkpoint.resume={ckpt}"], tmp_path / f"r{i}", nproc)
        assert sorted(got) == list(range(6, 11)), f"case {i}: steps {sorted(got)}"
        for s in got:
            assert got[s] == pytest.approx(one[s], rel=1e-6), f"case {i}: step {s}"


@pytest.mark.timeout(600)
def test_ep_tp_cli_matches_one_process_and_resumes_on_one_process_and_back(prepared, one,
                                                                           tmp_path):
    """EP=2 × TP=2 on 4 processes (`--parallel.dp_shard=2 --parallel.ep=2
    --parallel.tp=2`: the experts Shard(0) over ep and Replicate over tp, config/dims.py)
    against one process over 10 steps, then its step-5 checkpoint resumed on one process
    and the one process's resumed at EP=2 × TP=2: steps 6..10 of the uninterrupted run
    (DCP saves the tp replicas of an expert slice once and reshards (E, D, F) on load)."""
    data = f"--data.prepared_dir={prepared}"
    one_dir, one = one
    ep_tp = [*EP2, "--parallel.tp=2"]
    full = train([data, *ep_tp], tmp_path / "ep2tp2", nproc=4)
    assert sorted(full) == sorted(one) == list(range(1, 11))
    for s in one:
        assert full[s] == pytest.approx(one[s], rel=1e-6), f"EP=2 x TP=2 step {s}"
    par = json.loads((tmp_path / "ep2tp2" / "summary.json").read_text())["parallel"]
    assert (par["strategy"], par["tp"], par["ep"]) == ("fsdp+ep", 2, 2), par
    cases = [(["--parallel.dp_shard=1"], 1,
              tmp_path / "ep2tp2" / "checkpoints" / "step-00000005"),
             (ep_tp, 4, one_dir / "checkpoints" / "step-00000005")]
    for i, (layout, nproc, ckpt) in enumerate(cases):
        got = train([data, *layout, f"--checkpoint.resume={ckpt}"], tmp_path / f"r{i}", nproc)
        assert sorted(got) == list(range(6, 11)), f"case {i}: steps {sorted(got)}"
        for s in got:
            assert got[s] == pytest.approx(one[s], rel=1e-6), f"case {i}: step {s}"


def test_ep_cli_with_selective_ac_matches_one_process(prepared, one, tmp_path):
    """Selective AC recomputes each block, both all-to-alls included, in the backward
    (test_moe_ep.py runs full and selective in fp64 too)."""
    ac = train([f"--data.prepared_dir={prepared}", *EP2,
                "--parallel.activation_checkpoint=selective"], tmp_path / "ac", nproc=2)
    one = one[1]
    assert sorted(ac) == sorted(one) == list(range(1, 11))
    for s in one:
        assert ac[s] == pytest.approx(one[s], rel=1e-6), f"EP=2, selective AC: step {s}"
    par = json.loads((tmp_path / "ac" / "summary.json").read_text())["parallel"]
    assert (par["strategy"], par["ac_blocks"]) == ("fsdp+ep", ["selective"] * 2), par


@pytest.mark.parametrize("args,nproc,needle", [
    (["--parallel.dp_shard=2", "--parallel.ep=4"], 2, "parallel.ep=4 must divide "
                                                      "parallel.dp_shard=2"),
    (["--parallel.dp_shard=4", "--parallel.ep=4", "--model.moe_experts=6"], 4,
     "must divide model.moe_experts=6"),
    (["--model.name=gpt", "--model.moe_experts=0", "--model.moe_d_ff=0",
      "--model.moe_router=softmax", "--model.moe_aux_loss=0",
      "--model.moe_bias_update_rate=0", "--parallel.dp_shard=2", "--parallel.ep=2"], 2,
     "needs a mixture-of-experts model"),
    (["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--parallel.ep=2"], 2,
     "parallel.ep=2 must divide parallel.dp_shard=1"),
])
def test_bad_ep_layout_exits_2_before_launch(tmp_path, args, nproc, needle):
    proc = scaletrain("train", *RUN, *args, f"--run.dir={tmp_path / 'run'}",
                      "--nproc", str(nproc))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before anything was written
