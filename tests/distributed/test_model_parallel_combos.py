"""2-D layouts on 4 processes (DP×TP, DP×PP, TP×PP) against one process, and a TP×PP
checkpoint resumed in one process."""

from __future__ import annotations

import pytest

from mp_harness import assert_parity, mp_run, mp_runs, mp_spec, reference
from spawn import run_distributed


LAYOUTS = {"dp2xtp2": dict(dp_shard=2, tp=2), "dp2xpp2": dict(dp_shard=2, pp=2),
           "tp2xpp2": dict(tp=2, pp=2)}


def test_4_process_layouts_match_one_process_and_tp_pp_checkpoint_resumes(tmp_path):
    """DP×TP, DP×PP, TP×PP (20 steps each) against one process, then a TP×PP run that
    saves at step 3 and resumes in one process — all in one spawned group of 4."""
    specs = [mp_spec(**kw) for kw in LAYOUTS.values()]
    specs.append(mp_spec(steps=3, tp=2, pp=2, save=str(tmp_path)))
    outs = run_distributed(mp_runs, 4, specs, timeout=170)[0]
    for name, spec, got in zip(LAYOUTS, specs, outs):
        try:
            assert_parity(reference(spec), got)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    full = reference(mp_spec(steps=4))
    resumed = mp_run(0, 1, mp_spec(steps=1, load=str(tmp_path)))
    a, b = full["losses"][3], resumed["losses"][0]
    assert abs(a - b) / a <= 1e-6, (a, b)


@pytest.mark.parametrize("args,needle", [
    (["--world", "2", "--parallel.pp=2", "--model.n_layer=3"], "must divide model.n_layer=3"),
    (["--world", "4", "--parallel.tp=4", "--model.n_head=2"],
     "parallel.tp=4 must divide model.n_head=2"),
    (["--world", "2", "--parallel.tp=2", "--model.vocab_size=67"],
     "vocabulary size (model.vocab_size or the tokenizer's)=67"),
    (["--world", "4", "--parallel.tp=3"], "world size 4"),
    (["--world", "2", "--parallel.pp=2", "--parallel.pp_microbatches=1"],
     "pp_microbatches=1 must be >= parallel.pp=2"),
    (["--world", "4", "--parallel.tp=2", "--parallel.dp_replicate=2"],
     "DDP does not compose with tensor parallel"),
])
def test_invalid_layouts_exit_2_naming_the_constraint(args, needle, capsys):
    from scaletrain.cli import main

    base = ["plan", "--model.n_layer=2", "--model.n_head=2", "--model.d_model=16",
            "--model.seq_len=16", "--model.vocab_size=64", "--parallel.dp_shard=-1",
            "--train.batch_size=8", "--train.micro_batch_size=2"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_plan_reports_bytes_and_bubble(capsys):
    import json

    from scaletrain.cli import main

    assert main(["plan", "--model.n_layer=4", "--model.n_head=2", "--model.d_model=16",
                 "--model.seq_len=16", "--model.vocab_size=64", "--world", "4",
                 "--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=1",
                 "--train.batch_size=8", "--train.micro_batch_size=2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layout"]["mesh"] == {"pp": 2, "tp": 2}
    assert r["bubble"] == pytest.approx(1 / 5)  # p=2, m=4: (p-1)/(m+p-1)
    assert [k["layers"] for k in r["ranks"]] == [2, 2]
    assert all(k["param_bytes"] > 0 and k["activation_bytes"] > 0 for k in r["ranks"])
