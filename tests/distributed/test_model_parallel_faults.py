"""The fault guard (train/faults.py) under tensor and pipeline parallelism (issue #6):
it sees the global loss of the step — the one-process loss, not a sum over the TP ranks
that hold it or over the pipeline stages it was shared with — and a NaN injected at
step 3 (on the last pipeline stage's final norm) is skipped on every rank exactly as on
one process, after which the runs go on with the same losses."""

from __future__ import annotations

import math

from mp_harness import mp_runs, mp_spec, reference
from spawn import run_distributed

NAN_STEP = 3
LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2)}


def test_tp2_and_pp2_guard_sees_the_one_process_loss_and_skips_an_injected_nan():
    specs = [mp_spec(steps=6, faults=True, nan_step=NAN_STEP, **kw) for kw in LAYOUTS.values()]
    ref = reference(specs[0])
    want_skipped = [s == NAN_STEP for s in range(1, 7)]
    assert ref["skipped"] == want_skipped and math.isnan(ref["losses"][NAN_STEP - 1])
    assert len(ref["guard_history"]) == 5
    outs = run_distributed(mp_runs, 2, specs, timeout=120)
    for i, name in enumerate(LAYOUTS):
        for rank in (0, 1):
            got = outs[rank][i]
            assert got["skipped"] == want_skipped, (name, rank, got["skipped"])
            assert math.isnan(got["losses"][NAN_STEP - 1]), (name, rank)
            clean = [x for x in got["losses"] if not math.isnan(x)]
            # the guard's loss is the logged (global) loss, on every rank ...
            assert got["guard_history"] == clean, (name, rank)
            # ... and the one-process loss, before and after the skipped step
            for s, (a, b) in enumerate(zip(ref["guard_history"], got["guard_history"])):
                assert abs(a - b) / a <= (1e-6 if s == 0 else 1e-5), (name, rank, s, a, b)
