"""model.loss_chunks under tensor parallel (loss-parallel, and sequence parallel), in a
pipeline's last stage and under FSDP2: the per-step losses and grad norms of fp64 runs
equal the same layout unchunked and the one-process run (models/chunked_loss.py)."""

from __future__ import annotations

from mp_harness import assert_parity, mp_runs, mp_spec, reference
from spawn import run_distributed

LAYOUTS = [  # (name, layout fields, model fields)
    ("gpt tp2 loss-parallel", dict(tp=2), ()),
    # (document masking's per-document positions do not run under SP, chunked or not)
    ("gpt tp2 sequence-parallel", dict(tp=2, sp=True, eot=None), ()),
    ("llama tied tp2 loss-parallel", dict(tp=2), (("name", "llama"),
                                                  ("tie_embeddings", True))),
    ("gpt pp2 1f1b", dict(pp=2), ()),
    ("gpt fsdp2", dict(dp_shard=2), ()),  # the head's recompute inside FSDP2's backward
    ("llama pp2 gpipe", dict(pp=2, schedule="gpipe"), (("name", "llama"),)),
]


def _spec(layout: dict, model: tuple, chunks: int) -> dict:
    return mp_spec(steps=4, dtype="fp64", masked=True,
                   model=model + (("loss_chunks", chunks),), **{"eot": 7, **layout})


def test_chunked_loss_matches_unchunked_under_tp_and_pp():
    specs = [_spec(layout, model, c) for _, layout, model in LAYOUTS for c in (0, 3)]
    outs = run_distributed(mp_runs, 2, specs, timeout=240)
    for i, (name, _, _) in enumerate(LAYOUTS):
        plain, chunked = outs[0][2 * i], outs[0][2 * i + 1]
        for a, b in zip(plain["losses"] + plain["norms"], chunked["losses"] + chunked["norms"]):
            assert abs(a - b) <= 1e-10 * abs(a), f"{name}: chunked {b!r} vs {a!r}"
        assert outs[1][2 * i + 1]["losses"] == chunked["losses"], name  # every rank
        ref = reference(specs[2 * i + 1])  # one process, chunked
        try:
            assert_parity(ref, chunked, first_tol=1e-10, tol=1e-9)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
