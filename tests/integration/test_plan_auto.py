"""`scaletrain train --plan.auto=true` runs the --fit search at start-up, applies its
overrides and logs them (stderr, plan.json, summary.json, the resolved config.toml)."""

from __future__ import annotations

import json

from tests.conftest import make_cfg, run_cli


def test_plan_auto_applies_and_logs_the_chosen_micro_batch(tiny_args, tmp_path):
    from scaletrain.config.dims import ParallelDims
    from scaletrain.plan.report import plan
    from scaletrain.plan.auto import plan_vocab

    args = tiny_args + ["--train.steps=2", "--train.micro_batch_size=8",
                        "--eval.test=false", "--train.device=cpu"]
    # A budget that fits micro-batch 4 but not 8: gradient accumulation must take over.
    half = make_cfg(args[:-3] + ["--train.micro_batch_size=4", "--train.device=cpu"])
    full = make_cfg(args)
    peak4 = plan(half, ParallelDims(1, 1, 1, 1, 1), plan_vocab(half))["ranks"][0]["peak_bytes"]
    peak8 = plan(full, ParallelDims(1, 1, 1, 1, 1), plan_vocab(full))["ranks"][0]["peak_bytes"]
    assert peak4 < peak8
    gib = (peak4 + 1) / 2**30
    proc = run_cli("train", *args, "--plan.auto=true", f"--plan.memory_gib={gib!r}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plan.auto: --train.micro_batch_size=4" in proc.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"]["overrides"] == {"train.micro_batch_size": 4}
    assert summary["parallel"]["accumulation_steps"] == 2
    assert json.loads((run / "plan.json").read_text())["args"] == [
        "--train.micro_batch_size=4"]
    assert "micro_batch_size = 4" in (run / "config.toml").read_text()


def test_plan_auto_exits_2_when_nothing_fits(tiny_args):
    proc = run_cli("train", *tiny_args, "--train.steps=1", "--plan.auto=true",
                   "--plan.memory_gib=0.01")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "nothing fits 0.01 GiB" in lines[0], proc.stderr


def test_plan_fit_cli_prints_overrides_and_exits_2_when_nothing_fits(tmp_path):
    ok = run_cli("plan", "--config", "configs/gpt-10m.toml", "--fit", "--memory-gib", "64")
    assert ok.returncode == 0, ok.stderr
    assert "predicted peak" in ok.stdout and "the config fits as it is" in ok.stdout
    bad = run_cli("plan", "--config", "configs/gpt-1b.toml", "--fit", "--memory-gib", "2")
    assert bad.returncode == 2
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "nothing fits 2.00 GiB" in lines[0], bad.stderr
