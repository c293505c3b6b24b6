"""Checkpoints of TP/PP layouts reload into any other layout (issue #6): the next step
after the resume has the loss of the uninterrupted one-process run, to 1e-6 relative
(fp32). Every case saves after step 3 and resumes for one step (the uninterrupted run's
step 4). The save/load path is checkpoint/manager.py's (mp_harness._checkpoint), with
the pipeline's tied head copy reading the embedding's optimizer state
(parallel/checkpoint_layout.py tied_load_names).

The 2-process layouts run in one spawned group; the 1-process saves and loads run in
the test process. TP=2 x PP=2 -> one process is in test_model_parallel_combos.py.
"""

from __future__ import annotations

from mp_harness import mp_run, mp_runs, mp_spec, reference
from spawn import run_distributed


def _close(a: float, b: float, what: str) -> None:
    assert abs(a - b) / abs(a) <= 1e-6, f"{what}: resumed loss {b!r} vs {a!r}"


def test_checkpoints_reload_across_tp_pp_ddp_layouts(tmp_path):
    d = {k: str(tmp_path / k) for k in ("one", "pp", "ddp", "gpipe4", "tp")}
    full2 = reference(mp_spec(steps=4))["losses"][3]
    full4 = reference(mp_spec(steps=4, n_layer=4))["losses"][3]
    mp_run(0, 1, mp_spec(steps=3, save=d["one"]))
    cases = [  # (what, save spec, resume spec, expected loss); in this order
        ("1-proc -> PP=2", None, mp_spec(steps=1, pp=2, load=d["one"]), full2),
        ("PP=2 -> TP=2", mp_spec(steps=3, pp=2, schedule="gpipe", save=d["pp"]),
         mp_spec(steps=1, tp=2, load=d["pp"]), full2),
        ("DDP=2 -> PP=2", mp_spec(steps=3, dp_replicate=2, save=d["ddp"]),
         mp_spec(steps=1, pp=2, load=d["ddp"]), full2),
        # 4 micro-batches of 2 (gpipe) -> 8 of 1, two stages per rank (interleaved)
        ("PP=2 gpipe -> PP=2 interleaved, m 4 -> 8",
         mp_spec(steps=3, pp=2, n_layer=4, schedule="gpipe", save=d["gpipe4"]),
         mp_spec(steps=1, pp=2, n_layer=4, micro=1, schedule="interleaved-1f1b",
                 load=d["gpipe4"]), full4),
        ("TP=2 save", mp_spec(steps=3, tp=2, save=d["tp"]), None, None),
    ]
    specs = [s for _, save, load, _ in cases for s in (save, load) if s is not None]
    outs = run_distributed(mp_runs, 2, specs, timeout=170)
    by_spec = {id(s): (r0, r1) for s, r0, r1 in zip(specs, outs[0], outs[1])}
    for what, _, load, want in cases:
        if load is not None:
            r0, r1 = by_spec[id(load)]
            _close(want, r0["losses"][0], what)
            assert r0["losses"] == r1["losses"], what  # every rank logs the same loss
    # ... and back into one process: from the PP=2 and the TP=2 checkpoints.
    _close(full2, mp_run(0, 1, mp_spec(steps=1, load=d["pp"]))["losses"][0], "PP=2 -> 1-proc")
    _close(full2, mp_run(0, 1, mp_spec(steps=1, load=d["tp"]))["losses"][0], "TP=2 -> 1-proc")
