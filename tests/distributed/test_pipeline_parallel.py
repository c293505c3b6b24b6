"""Pipeline parallel (parallel/pipeline.py, pipeline_step.py): each schedule's 20-step
losses against one process; the split, the bubble formula and the layout checks."""

from __future__ import annotations

import pytest

from mp_harness import assert_parity, mp_runs, mp_spec, reference
from spawn import run_distributed


SCHEDULES = [("gpipe", 2), ("1f1b", 2), ("interleaved-1f1b", 4)]


def test_pp2_each_schedule_matches_one_process():
    """gpipe, 1f1b and interleaved-1f1b (2 stages per rank), 20 steps each, in one
    spawned pair of processes."""
    specs = [mp_spec(pp=2, schedule=s, n_layer=n) for s, n in SCHEDULES]
    outs = run_distributed(mp_runs, 2, specs, timeout=170)
    for (schedule, _), spec, r0, r1 in zip(SCHEDULES, specs, outs[0], outs[1]):
        try:
            assert_parity(reference(spec), r0)
        except AssertionError as e:
            raise AssertionError(f"{schedule}: {e}") from None
        assert r0["losses"] == r1["losses"], schedule  # every stage reports the loss


def test_split_bounds_even_and_manual():
    from scaletrain.errors import ConfigError
    from scaletrain.parallel.pipeline import split_bounds

    assert split_bounds(4, 2) == [(0, 2), (2, 4)]
    assert split_bounds(5, 2, "1") == [(0, 1), (1, 5)]
    with pytest.raises(ConfigError, match="must divide model.n_layer=5"):
        split_bounds(5, 2)
    with pytest.raises(ConfigError, match="strictly increasing"):
        split_bounds(4, 3, "2,2")
    with pytest.raises(ConfigError, match="gives 2 stages but the pipeline has 3"):
        split_bounds(4, 3, "2")


def test_bubble_fraction_formula():
    from scaletrain.parallel.pipeline import bubble_fraction

    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", 2, 2) == pytest.approx(1 / 3)
    assert bubble_fraction("interleaved-1f1b", 2, 4, v=2) == pytest.approx(1 / 9)
    assert bubble_fraction("1f1b", 1, 4) == 0.0


def test_fewer_microbatches_than_stages_is_a_config_error():
    from scaletrain.config.schema import ParallelConfig
    from scaletrain.errors import ConfigError
    from scaletrain.parallel.pipeline import check_pp

    with pytest.raises(ConfigError, match=r"pp_microbatches=1 must be >= parallel.pp=2"):
        check_pp(ParallelConfig(pp=2), 4, 1)
    with pytest.raises(ConfigError, match="multiple of"):
        check_pp(ParallelConfig(pp=2, pp_schedule="interleaved-1f1b"), 4, 3)
    check_pp(ParallelConfig(pp=2), 4, 2)


def test_pipeline_with_ddp_or_fsdp_matches_one_process_and_resumes(tmp_path):
    """On 4 processes: plain DP (dp_replicate=2; the pipeline all-reduces the gradients
    itself) x PP=2 with 1f1b and with interleaved-1f1b, and FSDP (dp_shard=2; each stage
    of a rank its own FSDP root) x interleaved PP=2 — 10 steps each against one process;
    then an FSDP x interleaved checkpoint (step 3) resumes in one process."""
    from mp_harness import mp_run

    il = dict(pp=2, n_layer=4, micro=1, schedule="interleaved-1f1b")
    layouts = {"ddp2 x 1f1b": dict(dp_replicate=2, pp=2), "ddp2 x interleaved":
               dict(dp_replicate=2, **il), "fsdp2 x interleaved": dict(dp_shard=2, **il)}
    specs = [mp_spec(steps=10, **kw) for kw in layouts.values()]
    specs.append(mp_spec(steps=3, dp_shard=2, save=str(tmp_path), **il))
    outs = run_distributed(mp_runs, 4, specs, timeout=170)
    for name, spec, r0, r3 in zip(layouts, specs, outs[0], outs[3]):
        try:
            assert_parity(reference(spec), r0)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        assert r0["losses"] == r3["losses"], name
    full = reference(mp_spec(steps=4, n_layer=4, micro=1))["losses"][3]
    got = mp_run(0, 1, mp_spec(steps=1, n_layer=4, micro=1, load=str(tmp_path)))["losses"][0]
    assert abs(got - full) / full <= 1e-6, (got, full)
