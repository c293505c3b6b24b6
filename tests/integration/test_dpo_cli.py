"""`scaletrain train --train.objective=dpo` as users run it: the reward keys of the train
records, DPO's evaluation records, the frozen reference (init.from's weights, unchanged
by training), and the one-line exit 2 for bad preference input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_cfg, one_error_line, one_process_trainer, run_cli

WORDS = "the cat sat on a mat dog ran far away quick brown fox jumps over lazy".split()
TINY = ["--train.objective=dpo", "--data.vocab_size=300", "--model.name=gpt",
        "--model.n_layer=2", "--model.n_head=2", "--model.d_model=32", "--model.seq_len=32",
        "--train.batch_size=8", "--train.micro_batch_size=4", "--train.log_interval=1",
        "--train.progress=off", "--eval.interval=0", "--eval.batch_size=8",
        "--schedule.warmup_steps=0", "--data.val_fraction=0.1", "--data.test_fraction=0.1"]


def write_pairs(path, n: int = 48, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": f"Q: {text(3, 8)}\nA:", "chosen": f" yes {text(2, 12)}",
                                "rejected": f" no {text(2, 12)}"}) + "\n")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    write_pairs(d / "pairs.jsonl")
    return d


def args(pairs, run, *extra) -> list[str]:
    return [*TINY, f"--data.source={pairs / 'pairs.jsonl'}", f"--data.prepared_dir={pairs / 'p'}",
            f"--run.dir={run}", *extra]


@pytest.fixture(scope="module")
def dpo_run(pairs):
    run = pairs / "run"
    proc = run_cli("train", *args(pairs, run, "--train.steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_train_records_carry_rewards_and_eval_scores_pairs(dpo_run):
    recs = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    # Step 1: the policy is its reference, every ratio 0: loss log 2, margin 0.
    assert train[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert train[0]["dpo_reward_margin"] == 0.0
    for r in train:
        assert r["tokens"] == 8 * r["step"]  # pairs trained
        assert 0.0 <= r["dpo_accuracy"] <= 1.0
        assert r["dpo_reward_margin"] == pytest.approx(
            r["dpo_chosen_reward"] - r["dpo_rejected_reward"], rel=1e-9, abs=1e-12)
    assert train[-1]["dpo_reward_margin"] != 0.0  # the policy moved away from it
    evals = {r["split"]: r for r in recs if r["kind"] == "eval"}
    assert set(evals) == {"val", "test"}
    assert all(0.0 <= e["accuracy"] <= 1.0 and e["loss"] > 0 for e in evals.values())


def test_reference_is_init_from_weights_and_stays_frozen(pairs, dpo_run, tmp_path):
    cfg = make_cfg(args(pairs, tmp_path / "run", "--train.steps=1",
                        f"--init.from={dpo_run}", "--train.threads=1"))
    tr = one_process_trainer(cfg)
    ref = tr.loss.reference
    want = load_file(str(dpo_run / "model.safetensors"))
    ref_state = ref.state_dict()
    for name, w in want.items():
        assert torch.equal(ref_state[name], w), name
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training
    before = {k: v.clone() for k, v in ref_state.items()}
    tr.train_one_step()
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in before.items())
    moved = tr.model.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in before.items())  # the policy trained


def test_a_record_without_rejected_is_one_line(tmp_path):
    good = json.dumps({"prompt": "a b c", "chosen": "d", "rejected": "e"})
    (src := tmp_path / "bad.jsonl").write_text(
        "\n".join([good, good, json.dumps({"prompt": "a", "chosen": "b"})]) + "\n")
    proc = run_cli("train", *TINY, f"--data.source={src}", f"--data.prepared_dir={tmp_path}/p",
                   f"--run.dir={tmp_path}/run")
    one_error_line(proc, "bad.jsonl:3", "field 'rejected' is missing")
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # refused before anything is written


def test_a_prompt_longer_than_seq_len_is_one_line(tmp_path):
    long = json.dumps({"prompt": " ".join(WORDS * 10), "chosen": "d", "rejected": "e"})
    ok = json.dumps({"prompt": "a b c", "chosen": "d", "rejected": "e"})
    (src := tmp_path / "long.jsonl").write_text("\n".join([ok] * 4 + [long]) + "\n")
    proc = run_cli("train", *TINY, f"--data.source={src}", f"--data.prepared_dir={tmp_path}/p",
                   f"--run.dir={tmp_path}/run", "--data.val_fraction=0",
                   "--data.test_fraction=0")
    one_error_line(proc, "train pair 4", "leaving no room for a response", "model.seq_len=32")


@pytest.mark.parametrize("flag, fragment", [
    ("--parallel.tp=2", "parallel.tp=2 is not supported with train.objective='dpo'"),
    ("--data.document_masking=true", "data.document_masking is not supported"),
    ("--train.objective=dpos", "train.objective"),
    ("--train.objective=lm --dpo.beta=0.5", "dpo.beta is set but train.objective='lm'"),
])
def test_settings_dpo_does_not_honour_are_one_line(tmp_path, flag, fragment):
    proc = run_cli("train", *TINY, f"--data.source={tmp_path}/none.jsonl", *flag.split(),
                   f"--run.dir={tmp_path}/run")
    one_error_line(proc, fragment)


def test_lora_run_uses_the_base_as_reference_without_a_copy(pairs, dpo_run, tmp_path):
    cfg = make_cfg(args(pairs, tmp_path / "run", "--train.steps=2", f"--init.from={dpo_run}",
                        "--finetune.lora_rank=2", "--finetune.lora_alpha=4",
                        "--train.threads=1"))
    tr = one_process_trainer(cfg)
    assert not isinstance(tr.loss.reference, torch.nn.Module)  # the policy, adapters off
    n_params = sum(p.numel() for p in tr.model.parameters())
    first, _ = tr.train_one_step()  # B = 0: the policy is the base, every ratio 0
    assert first.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    second, _ = tr.train_one_step()  # adapters trained: the policy left its reference
    assert second.loss.item() != pytest.approx(math.log(2), rel=1e-6)
    assert sum(p.numel() for p in tr.model.parameters()) == n_params


def train_losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_resume_keeps_init_from_as_the_reference(pairs, dpo_run, tmp_path):
    """A resumed run's reference is init.from's weights again, not the checkpoint's: the
    losses after the resume are those of the uninterrupted run (exactly)."""
    common = ["--schedule.name=constant", f"--init.from={dpo_run}", "--eval.test=false"]
    full = run_cli("train", *args(pairs, tmp_path / "full", "--train.steps=2", *common))
    assert full.returncode == 0, full.stderr[-3000:]
    for steps in (1, 2):
        part = run_cli("train", *args(pairs, tmp_path / "part", f"--train.steps={steps}",
                                      *common))
        assert part.returncode == 0, part.stderr[-3000:]
    assert "resuming" in part.stderr
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")


def test_scaletrain_eval_of_a_dpo_run_is_one_line(dpo_run):
    one_error_line(run_cli("eval", str(dpo_run)), "a DPO run's DPO loss and accuracy")
