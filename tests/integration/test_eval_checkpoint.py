"""`scaletrain eval` scores a checkpoint RUN/checkpoints/step-N, not only a run, an export
or an HF directory (issue 18: "scores a run, a checkpoint or an HF directory"): the loss
on a split and lm-eval tasks, with the run's config and tokenizer and the checkpoint's
tensors; lm-eval results go into the run at the checkpoint's step."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import TINY_DATA, TINY_GPT, one_error_line, run_cli

pytest.importorskip("lm_eval")
from tests.integration.test_lm_eval import _task_dir  # noqa: E402  (after the importorskip)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def run(prepared_dir, tmp_path_factory):
    """A tiny run of 4 steps with checkpoints at steps 2 and 4 (final = step 4)."""
    run = tmp_path_factory.mktemp("ckpt_eval") / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=4", "--checkpoint.interval=2", "--eval.test=false",
                   "--optim.lr=1e-2", "--train.threads=1", f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _loss(*args: str) -> float:
    proc = run_cli("eval", *args, "--split", "val", "--train.threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["loss"]


def test_a_checkpoint_scores_like_the_weights_of_its_step(run):
    ckpts = run / "checkpoints"
    last = _loss(str(ckpts / "step-00000004"))
    assert last == pytest.approx(_loss(str(run), "--weights", "final"), rel=1e-6, abs=0)
    # step 2's weights are another model: the loss is not the last one's
    assert abs(_loss(str(ckpts / "step-00000002")) - last) > 1e-4


def test_lm_eval_tasks_on_a_checkpoint_report_into_its_run(run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    tasks = _task_dir(tasks)
    env = {"HF_DATASETS_OFFLINE": "1"}
    scores = []
    for target, extra in ((run / "checkpoints" / "step-00000004", []),
                          (run, ["--weights", "final"])):
        proc = run_cli("eval", str(target), "--tasks=st_mc", f"--include-path={tasks}",
                       "--train.threads=1", *extra, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        newest = sorted((run / "lm_eval").glob("results-*.json"))[-1]
        scores.append(json.loads(newest.read_text()))
    from_ckpt, from_run = scores
    assert from_ckpt["step"] == 4 and from_ckpt["weights"] == "checkpoint"
    assert from_ckpt["model_dir"].endswith("step-00000004")
    assert from_ckpt["metrics"] == from_run["metrics"]
    assert not (run / "checkpoints" / "step-00000004" / "lm_eval").exists()


def test_a_corrupt_or_orphaned_checkpoint_is_one_line(run, tmp_path):
    src = run / "checkpoints" / "step-00000002"
    orphan = tmp_path / "step-00000002"
    shutil.copytree(src, orphan)
    one_error_line(run_cli("eval", str(orphan)), "outside a run directory")
    bad = tmp_path / "bad" / "checkpoints" / "step-00000002"
    shutil.copytree(run, tmp_path / "bad", ignore=shutil.ignore_patterns("step-00000004"))
    shard = next(p for p in sorted(bad.rglob("*.distcp")))
    shard.write_bytes(shard.read_bytes()[:-8])
    one_error_line(run_cli("eval", str(bad)), str(shard), "truncated")


def test_text_weights_without_their_tokenizer_are_one_line(run, tmp_path):
    """A safetensors export whose tokenizer.json went missing: one line naming the
    directory for eval and generate (it was a size-mismatch traceback: the model was
    built with an empty vocabulary)."""
    out = tmp_path / "st"
    proc = run_cli("export", str(run), "--format", "safetensors", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "tokenizer.json").unlink()
    for cmd in ("eval", "generate"):
        one_error_line(run_cli(cmd, str(out)), str(out), "has no tokenizer.json")
