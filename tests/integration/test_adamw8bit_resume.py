"""`optim.name=adamw8bit` through the real CLI: its 8-bit state goes into the DCP
checkpoint as int8/uint8 codes + fp32 scales (with bf16-pure also the fp32 masters of
optim/master_weights.py), and a run resumed from a checkpoint logs bitwise the same
losses as the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(180)

ARGS = ["--model.d_model=64", "--optim.name=adamw8bit", "--train.steps=8",
        "--checkpoint.interval=4", "--schedule.name=cosine", "--eval.test=false",
        "--train.threads=1", "--optim.lr=3e-3"]


def train_losses(run: Path) -> dict[int, float]:
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


# bf16-pure also guards optim/master_weights.py: it used to leave an empty state entry
# per parameter at construction, DCP then took the state as initialised and loaded none
# of it on resume (with torch's AdamW too) — the losses after the first resumed step
# differed by ~1e-3.
@pytest.mark.parametrize("dtype", ["fp32", "bf16-pure"])
def test_resume_is_bitwise_and_state_is_8bit(tiny_args, tmp_path, dtype):
    base = [a for a in tiny_args if not a.startswith("--run.dir")] + ARGS + [
        f"--precision.dtype={dtype}"]
    full = tmp_path / "full"
    done = run_cli("train", *base, f"--run.dir={full}")
    assert done.returncode == 0, done.stderr[-3000:]
    ref = train_losses(full)
    assert sorted(ref) == list(range(1, 9)) and ref[8] < ref[1]

    ckpt = full / "checkpoints" / "step-00000004"
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    dtypes = {k.rsplit(".", 1)[-1]: v.properties.dtype for k, v in meta.items()
              if ".blocks.0.mlp.c_fc.weight." in k and k.startswith("app.optim.state.")}
    assert dtypes["exp_avg"] == torch.int8 and dtypes["exp_avg_sq"] == torch.uint8
    assert dtypes["exp_avg_scale"] == dtypes["exp_avg_sq_scale"] == torch.float32
    assert ("master" in dtypes) == (dtype == "bf16-pure")

    resumed = tmp_path / "resumed"
    proc = run_cli("train", *base, f"--run.dir={resumed}", f"--checkpoint.resume={ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = train_losses(resumed)
    assert got == {s: ref[s] for s in range(5, 9)}  # bitwise: floats written with repr
