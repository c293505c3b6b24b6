"""A parameter-server resume under a changed config, through the CLI (issue 13 item 3).

As in the main trainer (tests/integration/test_resume.py): changed optimizer/schedule
flags train at the new config's schedule from the resumed step on and are listed in one
stderr line; a changed model shape is refused with the list of differences, exit 2,
before any process starts. The resumes pass only the run dir and the changes: the rest
comes from the run's saved config.toml (item 4).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_DATA, TINY_GPT, run_cli
from tests.integration.test_resume import cosine_lr, one_error_line, train_lrs

pytestmark = pytest.mark.timeout(180)

PS = ["--parallel.mode=ps", "--parallel.ps_servers=1", "--nproc", "2"]  # 1 server, 1 worker


@pytest.fixture(scope="module")
def ps_run(prepared_dir, tmp_path_factory) -> Path:
    """A finished 10-step PS run with checkpoints at steps 5 and 10 (copied per test)."""
    run = tmp_path_factory.mktemp("ps") / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=10", "--checkpoint.interval=5", "--eval.test=false",
                   f"--run.dir={run}", *PS, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_ps_resume_with_new_lr_trains_at_the_new_schedule(ps_run, tmp_path):
    run = Path(shutil.copytree(ps_run, tmp_path / "run"))
    proc = run_cli("train", f"--run.dir={run}", "--train.steps=16", "--optim.lr=1e-4",
                   "--schedule.min_lr=1e-5", "--optim.weight_decay=0.05", *PS, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000010" in proc.stderr
    changed = [ln for ln in proc.stderr.splitlines() if "changed settings" in ln]
    assert len(changed) == 1, proc.stderr  # rank 0 only
    for fragment in ("optim.lr: 0.001 -> 0.0001", "schedule.min_lr: 0.0 -> 1e-05",
                     "train.steps: 10 -> 16", "optim.weight_decay: 0.1 -> 0.05"):
        assert fragment in changed[0], changed[0]
    lrs = train_lrs(run)
    assert sorted(lrs) == list(range(1, 17))
    # Without the fix: step 11 ran at the old schedule's last value (0.0), steps 12..16
    # at the old peak 1e-3 under the new schedule (3.0e-4 at step 12). abs=0: approx
    # would also accept anything within 1e-12 absolute (~1e-7 relative at these LRs).
    for step in range(11, 17):
        assert lrs[step] == pytest.approx(cosine_lr(step - 1, 1e-4, 1e-5, 16),
                                       rel=1e-12, abs=0), step
    saved = (run / "config.toml").read_text()
    assert "lr = 0.0001" in saved and "min_lr = 1e-05" in saved


def test_ps_resume_refuses_a_model_shape_change(ps_run, tmp_path):
    run = Path(shutil.copytree(ps_run, tmp_path / "run"))
    before = (run / "config.toml").read_text()
    proc = run_cli("train", f"--run.dir={run}", "--model.d_model=64", "--model.n_layer=3",
                   *PS, timeout=120)
    one_error_line(proc, "cannot resume from", "model.d_model: 32 -> 64",
                   "model.n_layer: 2 -> 3")
    assert (run / "config.toml").read_text() == before  # the run's own config kept
