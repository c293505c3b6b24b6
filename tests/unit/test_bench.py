"""`scaletrain bench` (bench/report.py) and the compile step clock: behaviour only."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_cfg, one_process_trainer


def test_step_clock_reports_first_step_excess_as_compile_time():
    from scaletrain.parallel.compile import StepClock

    clock = StepClock()
    for s in (5.0, 1.0, 2.0, 3.0):
        clock.add(s)
    r = clock.report(compiled=True)
    assert r == {"first_step_s": 5.0, "step_s": 2.0, "compile_s": 3.0}  # 5 - mean(1,2,3)
    assert clock.report(compiled=False)["compile_s"] is None


def test_bench_breakdown_adds_up_and_writes_json_and_png(tiny_args, tmp_path):
    from scaletrain.bench.report import format_table, run_bench, save

    tr = one_process_trainer(make_cfg(tiny_args + ["--model.n_layer=1"]))
    r = run_bench(tr, steps=2, warmup=1, pairs=1)
    parts = r["breakdown_s"]
    assert all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(r["step_s"], rel=1e-6)
    assert parts["forward"] > 0 and parts["optimizer"] > 0
    assert r["tokens_per_step"] == 8 * 32  # batch 8 x seq 32 targets
    assert 0 < r["mfu"] < 1 and r["hand_loop"]["hand_step_s"] > 0
    # The profiled step's operator categories cover its wall time (self times + gaps),
    # and a GPT's GEMMs are found; the shape-matched peak is measured, not assumed.
    assert sum(r["ops_s"].values()) == pytest.approx(r["profiled_step_s"], rel=0.05)
    assert r["ops_s"]["gemm"] > 0 and r["ops_s"]["optimizer"] > 0
    assert r["shape_matched_peak_flops"] > 0 and r["mfu_vs_shape_matched"] > 0
    assert "scaletrain / hand" in format_table(r)
    paths = save(r, tmp_path / "out")
    assert json.loads(paths[0].read_text())["tokens_per_s"] == pytest.approx(r["tokens_per_s"])
    assert paths[1].read_bytes()[:4] == b"\x89PNG"
    # The instance wrapper and hooks are gone: the trainer steps as before.
    assert "next_micro_batches" not in tr.__dict__
    assert not tr.model._forward_hooks and not tr.model._forward_pre_hooks
