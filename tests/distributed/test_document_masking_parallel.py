"""Document masking (data.document_masking) under tensor and pipeline parallelism: the
same losses as one process with the same mask (the TP shard's local heads share the
broadcast mask; every pipeline stage gets the document ids through the schedule's
keywords), for the GPT and the llama family."""

from __future__ import annotations

from mp_harness import mp_runs, mp_spec, reference
from spawn import run_distributed

EOT = 0
LLAMA = (("name", "llama"), ("n_kv_head", 2))
RTOL = 1e-6


def _spec(**kw) -> dict:
    return mp_spec(**{"steps": 4, "eot": EOT, "n_head": 4, **kw})


def test_masked_tp_and_pp_match_one_process():
    runs = {
        "gpt tp2": _spec(tp=2),
        "gpt pp2 1f1b": _spec(pp=2),
        "llama tp2+sp": _spec(tp=2, sp=True, model=LLAMA),
        "llama pp2 gpipe": _spec(pp=2, schedule="gpipe", model=LLAMA),
    }
    outs = run_distributed(mp_runs, 2, list(runs.values()), timeout=120)
    for i, (name, spec) in enumerate(runs.items()):
        ref = reference(spec)["losses"]
        # The mask matters: the unmasked one-process run has other losses.
        unmasked = reference({**spec, "eot": None})["losses"]
        assert max(abs(a - b) / a for a, b in zip(ref, unmasked)) > 1e-4, name
        for rank in (0, 1):
            got = outs[rank][i]["losses"]
            rel = max(abs(a - b) / a for a, b in zip(ref, got))
            assert rel <= RTOL, f"{name}, rank {rank}: loss rel diff {rel:.2e}"
