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


def test_cli_pp2_and_tp2_train_like_one_process(tmp_path):
    """Through the real CLI (trainer: schedule-driven step, pipeline eval, weights
    gathered from the stages, checkpoints): `--nproc 2` with pp=2 and with tp=2 log the
    one-process losses, and their summary.json counts the whole model's parameters and
    FLOPs."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from scaletrain.cli import main

    root = Path(__file__).parents[2]
    common = ["--config", str(root / "configs/tiny.toml"), "--data.max_files=20",
              "--data.vocab_size=300", "--model.n_layer=2", "--model.d_model=32",
              "--model.n_head=2", "--model.seq_len=32", "--train.steps=3",
              "--train.batch_size=8", "--train.micro_batch_size=2", "--train.log_interval=1",
              "--eval.interval=0", "--eval.batches=2", "--eval.batch_size=8",
              "--eval.test_batches=2", "--schedule.warmup_steps=0", "--train.progress=off", "--run.overwrite=true",
              f"--data.prepared_dir={tmp_path / 'prep'}", "--checkpoint.interval=2"]
    assert main(["prepare", *common]) == 0
    assert main(["train", *common, f"--run.dir={tmp_path / 'one'}"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root),
                                                        os.environ.get("PYTHONPATH", "")])}

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["kind"], r["loss"]) for r in map(json.loads, lines)]

    ref = losses(tmp_path / "one")
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    one_fpt = one["mfu"] * one["peak_flops"] / one["tokens_per_s"]
    for name, extra in (("pp", "--parallel.pp=2"), ("tp", "--parallel.tp=2")):
        proc = subprocess.run([sys.executable, "-m", "scaletrain", "train", *common,
                               f"--run.dir={tmp_path / name}", "--nproc", "2", extra,
                               "--parallel.dp_shard=1"],
                              env=env, capture_output=True, text=True, timeout=170)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = losses(tmp_path / name)
        assert [k for k, _ in got] == [k for k, _ in ref], name
        for (_, a), (_, b) in zip(ref, got):
            assert abs(a - b) / a <= 1e-6, (name, a, b)
        assert (tmp_path / name / "checkpoints" / "step-00000002").is_dir()
        # summary.json describes the whole model, not rank 0's stage or shard: the same
        # parameter count and FLOPs per token (= MFU x world peak / tokens per s) as one
        # process
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["params"] == one["params"], (name, s["params"], one["params"])
        # MFU divides by the peak of all ranks together (world_size x one device's)
        fpt = s["mfu"] * s["peak_flops"] * s["world_size"] / s["tokens_per_s"]
        assert abs(fpt - one_fpt) / one_fpt <= 1e-6, (name, fpt, one_fpt)
