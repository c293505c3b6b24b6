"""The digits CNN learns: >= 95% test accuracy (it reaches ~98.5% in 120 steps)."""

import json
from pathlib import Path

from tests.conftest import run_cli


def test_digits_cnn_reaches_95_percent(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/digits-cnn.toml", f"--run.dir={run}",
                   f"--data.prepared_dir={tmp_path / 'prep'}", "--train.steps=120",
                   "--eval.interval=0", "--train.progress=off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.95, summary["test"]
    # Accuracy is measured on the held-out test split, never seen in training or selection.
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and r["split"] == "test" for r in records)
    assert Path(run / "plots" / "loss.png").is_file()
