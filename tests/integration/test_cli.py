"""The CLI as a user runs it: end to end, reproducible, and bad input -> exit 2, one line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_cfg, run_cli


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--train.stepz=5"], ["train.stepz", "did you mean 'train.steps'"]),
    (["--optim.lr=-1"], ["optim.lr", "must be > 0"]),
    (["--model.n_head=5", "--model.d_model=128"], ["model.n_head=5", "model.d_model=128"]),
    (["--config", "no/such.toml"], ["no/such.toml", "does not exist"]),
])
def test_bad_config_exits_2(args, fragments, tmp_path):
    assert_user_error(run_cli("train", f"--run.dir={tmp_path}/r", *args), *fragments)


def test_missing_data_path(tmp_path):
    missing = tmp_path / "nope"
    proc = run_cli("train", f"--data.source={missing}", f"--data.prepared_dir={tmp_path}/p",
                   f"--run.dir={tmp_path}/r")
    assert_user_error(proc, str(missing))


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("train", f"--data.source={tmp_path}/empty",
                   f"--data.prepared_dir={tmp_path}/p", f"--run.dir={tmp_path}/r")
    assert_user_error(proc, "empty")


def test_directory_of_binary_files(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    for i in range(4):
        (d / f"f{i}.dat").write_bytes(bytes(range(256)) * 8)
    proc = run_cli("train", f"--data.source={d}", f"--data.prepared_dir={tmp_path}/p",
                   f"--run.dir={tmp_path}/r")
    assert_user_error(proc, str(d), "binary")


def test_unknown_command():
    proc = run_cli("trian")
    assert proc.returncode == 2 and "did you mean 'train'" in proc.stderr


def test_train_eval_generate_end_to_end(tiny_args, tmp_path):
    run = make_cfg(tiny_args).run.dir
    proc = run_cli("train", *tiny_args, "--train.steps=6", "--eval.interval=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from pathlib import Path

    d = Path(run)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "tokenizer.json",
                 "model.safetensors", "plots/loss.png", "plots/lr.png"):
        assert (d / name).is_file(), name
    assert list((d / "tensorboard").iterdir())
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_mb"):
        assert key in train[0]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["split"], r["step"]) for r in evals] == [("val", 0), ("val", 3), ("val", 6),
                                                        ("test", 6)]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["test"]["loss"] > 0

    proc = run_cli("eval", str(d), "--split", "test")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["split"] == "test"
    proc = run_cli("generate", str(d), "--generate.num_samples=1",
                   "--generate.max_new_tokens=8", "--generate.prompt=def ")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 1


def test_generate_on_a_directory_that_is_not_a_run(tmp_path):
    assert_user_error(run_cli("generate", str(tmp_path)), str(tmp_path), "not a scaletrain run")


def test_same_seed_runs_are_bitwise_identical(tiny_args, tmp_path):
    losses = []
    for name in ("a", "b"):
        args = [a for a in tiny_args if not a.startswith("--run.dir")]
        d = tmp_path / name
        proc = run_cli("train", *args, f"--run.dir={d}", "--train.steps=5",
                       "--model.dropout=0.1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in recs if r["kind"] == "train"])
    assert losses[0] == losses[1]  # exact float equality, as written with repr
