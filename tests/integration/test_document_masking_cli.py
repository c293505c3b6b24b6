"""`--data.document_masking=true` through the CLI, as users run it: training, the run's
evaluation and `scaletrain eval` all mask documents at the tokenizer's end-of-text; a
model without documents refuses the setting with one line."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import one_error_line, run_cli

pytestmark = pytest.mark.timeout(120)

WORDS = ("the model reads a window of tokens and each document ends with its own end of "
         "text token so attention stops there when masking is on while packing keeps every "
         "window full").split()


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """A corpus of 200 short documents (~40 tokens each): most 32-token windows hold a
    document boundary, unlike the built-in corpus's long files."""
    root = tmp_path_factory.mktemp("short_docs")
    rng = random.Random(0)
    for i in range(200):
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 30))]
        (root / f"doc{i:03d}.txt").write_text(f"Document {i}: " + " ".join(words) + ".\n")
    return ["--data.source=" + str(root), "--data.vocab_size=300", "--data.prep_workers=1",
            "--data.val_fraction=0.1", "--data.test_fraction=0.1",
            f"--data.prepared_dir={root / 'prepared'}"]


LLAMA = ["--model.name=llama", "--model.n_layer=2", "--model.n_head=2", "--model.n_kv_head=1",
         "--model.d_model=32", "--model.seq_len=32", "--train.batch_size=8",
         "--train.log_interval=1", "--train.progress=off", "--eval.interval=0",
         "--eval.batches=2", "--eval.batch_size=32", "--eval.test_batches=0",
         "--schedule.warmup_steps=0", "--train.threads=1", "--train.steps=3"]


def _eval(run_dir, *extra: str) -> float:
    """`scaletrain eval` as users run it, in its own process."""
    proc = run_cli("eval", str(run_dir), "--split", "test", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["loss"]


def test_masked_training_run_and_its_eval(short_docs, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *short_docs, *LLAMA, f"--run.dir={run}",
                   "--data.document_masking=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert "document_masking = true" in (run / "config.toml").read_text()
    summary = json.loads((run / "summary.json").read_text())
    # The same weights and batch without the mask: another first-step loss.
    plain = tmp_path / "plain"
    proc = run_cli("train", *short_docs, *LLAMA, f"--run.dir={plain}", "--train.steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == records[0]["step"] == 1
    assert abs(first["loss"] - records[0]["loss"]) > 1e-4
    # `scaletrain eval` reads the run's config: the same masked test loss ...
    assert _eval(run) == pytest.approx(summary["test"]["loss"], rel=1e-6)
    # ... which is not the loss of the same weights attending across documents.
    unmasked = _eval(run, "--data.document_masking=false")
    assert abs(unmasked - summary["test"]["loss"]) > 1e-4


def test_image_model_refuses_document_masking(tmp_path):
    proc = run_cli("train", "--model.name=mlp", "--data.source=digits", "--train.steps=1",
                   f"--run.dir={tmp_path / 'run'}", "--data.document_masking=true")
    one_error_line(proc, "data.document_masking", "mlp")
