"""data.mixture end to end through the CLI, as users run it (issue 16, "Mixtures"):
prepare, per-source metrics checked against a plain evaluation of each source, the same
global batches on 1 and 2 ranks (--nproc 2), and SIGKILL + resume bitwise identical."""

from __future__ import annotations

import json
import math
import os
import random
import sysconfig
from pathlib import Path

import pytest

from scaletrain.data.prepare import _text_target
from scaletrain.metrics.sinks import scalar_fields
from tests.conftest import make_cfg, one_error_line, run_cli
from tests.helpers.runs import popen, sigkill_at_step

pytestmark = pytest.mark.timeout(420)

WEIGHTS = {"code": 0.75, "prose": 0.25}
STEPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two small sources of real text: a JSONL dump and a folder of text files."""
    root = tmp_path_factory.mktemp("mix")
    std = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    (root / "code").mkdir()
    with open(root / "code" / "part-0.jsonl", "w", encoding="utf-8") as f:
        for p in std[:40]:
            f.write(json.dumps({"text": p.read_text(errors="replace")[:1500]}) + "\n")
    (root / "prose").mkdir()
    for p in std[40:80]:
        (root / "prose" / f"{p.stem}.txt").write_text(p.read_text(errors="replace")[:1500])
    return root


def args_for(corpus: Path, run: Path) -> list[str]:
    mixture = ", ".join(f'{{source = "{corpus / n}", weight = {w}}}'
                        for n, w in WEIGHTS.items())
    return [f"--data.mixture=[{mixture}]", "--data.vocab_size=300", "--data.prep_workers=1",
            f"--data.prepared_dir={corpus / 'prepared'}", "--data.loader_workers=2",
            "--model.name=gpt", "--model.n_layer=2", "--model.n_head=2",
            "--model.d_model=32", "--model.seq_len=32", "--model.dropout=0.0",
            "--train.batch_size=8", f"--train.steps={STEPS}", "--train.log_interval=1",
            "--train.progress=off", "--train.threads=1", "--precision.dtype=fp64",
            "--eval.interval=5", "--eval.batches=0", "--eval.batch_size=16",
            "--eval.test=false", "--schedule.warmup_steps=0", "--checkpoint.interval=4",
            f"--run.dir={run}"]


def records(run: Path, kind: str | None = None) -> list[dict]:
    text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    out = [json.loads(ln) for ln in text[: text.rfind("\n") + 1].splitlines()]
    return [r for r in out if kind is None or r["kind"] == kind]


def comparable(r: dict) -> dict:
    """A record without what depends on the machine's speed."""
    return {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "mem_mb")}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """An uninterrupted one-process run of the mixture (prepares it first, as users do).
    No dropout: its draws depend on which rank holds a sample, and the 2-rank run must
    reproduce these losses (the RNG streams' resume is tests/integration/test_resume.py's)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    prep = run_cli("prepare", *args_for(corpus, run))
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "prepared a mixture of 2 sources" in prep.stdout
    done = run_cli("train", *args_for(corpus, run))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_train_records_count_tokens_per_source_in_the_weights(reference):
    train = records(reference, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        seen = r["tokens_by_source"]
        assert set(seen) == set(WEIGHTS) and sum(seen.values()) == r["tokens"]
        # The blending keeps every prefix within one sample (32 tokens) of its share.
        for name, w in WEIGHTS.items():
            assert abs(seen[name] - w * r["tokens"]) <= 32
    tags = scalar_fields(train[-1])  # TensorBoard / MLflow / W&B chart names
    assert {"train/tokens_by_source/code", "train/tokens_by_source/prose"} <= set(tags)


def test_eval_loss_by_source_equals_a_plain_evaluation_of_each_source(reference, corpus):
    last = records(reference, "eval")[-1]
    assert last["step"] == STEPS and set(last["loss_by_source"]) == set(WEIGHTS)
    by = last["loss_by_source"]
    assert last["loss"] == pytest.approx(sum(w * by[n] for n, w in WEIGHTS.items()),
                                         rel=1e-12)
    assert "eval_val/loss_by_source/code" in scalar_fields(last)
    for name in WEIGHTS:  # the final weights on that source alone, by `scaletrain eval`
        proc = run_cli("eval", str(reference), "--weights=final", "--split=val",
                       "--data.mixture=[]", f"--data.source={corpus / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        loss = json.loads(proc.stdout.strip().splitlines()[-1])["loss"]
        # rel 1e-6: `eval` loads the run's fp64 weights into an fp32 model (seen: 9e-9);
        # the two sources' losses differ by > 1e-3, so a swap or a mix-up shows.
        assert loss == pytest.approx(by[name], rel=1e-6), (name, proc.stdout)
    assert abs(by["code"] - by["prose"]) > 1e-3
    # The mixture run itself: each source and the weighted loss, as training reports.
    proc = run_cli("eval", str(reference), "--weights=final", "--split=val")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert out["loss_by_source"] == pytest.approx(by, rel=1e-6)


def test_two_ranks_train_on_the_same_global_batches(reference, corpus, tmp_path):
    run = tmp_path / "two"
    proc = run_cli("train", *args_for(corpus, run), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = records(reference, "train"), records(run, "train")
    assert [r["tokens_by_source"] for r in two] == [r["tokens_by_source"] for r in one]
    # fp64: the same samples give the same losses to rounding; a different batch (one
    # sample swapped between sources) moves the loss by ~1e-3.
    for a, b in zip(one, two):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-10), (a["step"], a, b)
    for a, b in zip(records(reference, "eval"), records(run, "eval")):
        for name in WEIGHTS:
            assert math.isclose(a["loss_by_source"][name], b["loss_by_source"][name],
                                rel_tol=1e-10)


def test_sigkill_then_resume_is_bitwise_identical(reference, corpus, tmp_path):
    run = tmp_path / "killed"
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    target, delay = rng.randint(5, STEPS - 3), rng.uniform(0.0, 0.03)
    proc = popen(["train", *args_for(corpus, run)], tmp_path / "killed.log")
    sigkill_at_step(proc, run, run / "checkpoints" / "step-00000004", target, delay, seed,
                    timeout=300)
    resumed = run_cli("train", *args_for(corpus, run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-" in resumed.stderr
    got = [comparable(r) for r in records(run) if r["kind"] in ("train", "eval")]
    want = [comparable(r) for r in records(reference) if r["kind"] in ("train", "eval")]
    assert got == want, f"KILL_SEED={seed}"


def test_a_source_list_is_one_corpus_with_per_source_counts(reference, corpus):
    """data.source = [code, prose]: one prepared corpus (here the mixture's tokenizer
    corpus, already built by `reference`: the same key, a cache hit)."""
    listed = f'--data.source=["{corpus / "code"}", "{corpus / "prose"}"]'
    common = [a for a in args_for(corpus, reference) if not a.startswith("--data.mixture")]
    proc = run_cli("prepare", *common, listed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.splitlines()[0].split(" -> ")[1])
    assert path.name.startswith("code+1-")
    m = json.loads((path / "manifest.json").read_text())
    assert [s["source"] for s in m["sources"]] == [str(corpus / "code"), str(corpus / "prose")]
    for split in ("train", "val", "test"):  # (a small source may have no test document)
        per_source = [s["tokens"][split] for s in m["sources"]]
        assert sum(per_source) == m["splits"][split]["tokens"] > 0
    assert all(s["tokens"]["train"] > 0 for s in m["sources"])


def test_a_one_item_list_is_the_cache_of_that_source(corpus):
    common = ["--data.vocab_size=300", f"--data.prepared_dir={corpus / 'prepared'}"]
    one = make_cfg([*common, f"--data.source={corpus / 'code'}"]).data
    listed = make_cfg([*common, f'--data.source=["{corpus / "code"}"]']).data
    assert _text_target(one)[2:] == _text_target(listed)[2:]


@pytest.mark.parametrize("mixture, fragment", [
    ('[{{source="{c}/code", weight=0.5}}, {{source="{c}/prsoe", weight=0.5}}]',
     "data.mixture[1].source: '{c}/prsoe' does not exist (did you mean '{c}/prose'?)"),
    ('[{{source="{c}/code", weight=0}}]', "data.mixture[0].weight: must be a number > 0"),
])
def test_a_bad_mixture_is_one_line_before_any_process_starts(corpus, tmp_path, mixture,
                                                            fragment):
    run = tmp_path / "never"
    proc = run_cli("train", f"--data.mixture={mixture.format(c=corpus)}", "--nproc", "2",
                   f"--run.dir={run}")
    one_error_line(proc, fragment.format(c=corpus))
    assert not run.exists()  # refused before the run directory or torchrun


def test_mixture_and_source_both_set_is_one_line(corpus, tmp_path):
    both = run_cli("train", f'--data.mixture=[{{source="{corpus}/code", weight=1}}]',
                   f"--data.source={corpus}/prose", f"--run.dir={tmp_path / 'never'}")
    one_error_line(both, "data.mixture and data.source are both set")
