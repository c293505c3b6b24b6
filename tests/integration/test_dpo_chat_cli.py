"""DPO on chat-shaped preference records through the CLI (issue #18): an imported HF Qwen2
directory, its chat template, LoRA (the reference is the base with the adapters off);
the same run on two DDP processes and on two FSDP2 processes equals one process, and
so does LoRA chat SFT; bad input is one line, exit 2, before anything is written."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from scaletrain.checkpoint.run_model import load_model_from_run
from scaletrain.finetune.init_from import find_source, source_state
from scaletrain.finetune.lora import merge_lora
from tests.chat_dirs import WORDS, qwen_dir
from tests.conftest import one_error_line, run_cli

pytestmark = pytest.mark.timeout(400)

TRAIN = ["--train.objective=dpo", "--data.format=chat", "--model.seq_len=128",
         "--train.batch_size=4", "--train.micro_batch_size=2", "--train.progress=off",
         "--train.log_interval=1", "--eval.interval=0", "--eval.batch_size=4",
         "--eval.test=false", "--schedule.warmup_steps=0", "--schedule.name=constant",
         "--optim.lr=1e-2", "--train.threads=1", "--data.val_fraction=0.1",
         "--data.test_fraction=0"]
LORA = ["--finetune.lora_rank=4", "--finetune.lora_alpha=8",
        "--finetune.lora_targets=q_proj,v_proj,o_proj,down_proj"]
DDP = ["--nproc=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1"]
FSDP = ["--nproc=2", "--parallel.dp_replicate=1", "--parallel.dp_shard=2"]


def preference_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    out = []
    for i in range(n):
        prompt = [{"role": "system", "content": f"Rule {i}."}] if i % 3 == 0 else []
        if i % 2:  # a multi-turn prompt: its assistant turn is context
            prompt += [{"role": "user", "content": f"{words(3)}?"},
                       {"role": "assistant", "content": f"{words(4)}."}]
        prompt += [{"role": "user", "content": f"{words(rng.randint(2, 6))}?"}]
        out.append({"prompt": prompt,
                    "chosen": [{"role": "assistant", "content": f"yes {words(rng.randint(2, 8))}."}],
                    "rejected": [{"role": "assistant", "content": f"no {words(rng.randint(2, 8))}"}]})
    return out


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(HF directory, the data arguments)."""
    root = tmp_path_factory.mktemp("dpo_chat")
    d, _ = qwen_dir(root / "qwen")
    (src := root / "pairs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in preference_records(40)))
    return d, [f"--data.source={src}", f"--data.prepared_dir={root / 'prep'}",
               f"--init.from={d}"]


@pytest.fixture(scope="module")
def lora_sft(chat, tmp_path_factory):
    """A chat SFT run with LoRA (its weights file: the adapters only) on the prompt +
    chosen conversations: the tour's step before DPO."""
    _, data = chat
    root = tmp_path_factory.mktemp("sft")
    msgs = [r["prompt"] + r["chosen"] for r in preference_records(40)]
    (src := root / "sft.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n"
                                                   for m in msgs))
    args = [a for a in TRAIN if not a.startswith("--train.objective")]
    run = root / "run"
    proc = run_cli("train", *data, *args, *LORA, f"--data.source={src}", f"--run.dir={run}",
                   "--train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_init_from_a_lora_run_is_its_merged_model(chat, lora_sft):
    """A LoRA run as init.from gives its base with the adapters merged: the weights
    `merge_lora` gives the loaded run (exactly), which the adapters moved off the base."""
    got = source_state(find_source(lora_sft))
    _, model, _ = load_model_from_run(lora_sft)
    want = merge_lora(model).state_dict()
    base = source_state(find_source(chat[0]))
    assert set(got) == set(base) and set(got) <= set(want)
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    moved = [k for k in got if not torch.equal(got[k], base[k])]
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight", "o_proj.weight",
                                     "down_proj.weight")) for k in moved), moved


def train_records(run) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


def test_lora_dpo_on_chat_records_after_lora_sft(chat, lora_sft, tmp_path):
    """init.from the LoRA SFT run (merged) + new adapters. Step 1: the adapters are
    zero, the policy is its reference: loss log 2, margin 0; then the policy moves; only
    the adapters are saved; the run keeps the SFT run's chat template."""
    _, data = chat
    run = tmp_path / "run"
    proc = run_cli("train", *data, *TRAIN, *LORA, f"--run.dir={run}", "--train.steps=3",
                   f"--init.from={lora_sft}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = train_records(run)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert train[0]["dpo_reward_margin"] == 0.0
    assert train[-1]["dpo_reward_margin"] != 0.0
    assert (run / "tokenizer_config.json").is_file()
    from safetensors import safe_open
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert f.keys() and all(k.endswith((".lora_A", ".lora_B")) for k in f.keys())
    # Exported, the tokenizer renders with the same template as the training did.
    proc = run_cli("export", str(run), "--format", "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = preference_records(1)[0]
    msgs = rec["prompt"] + rec["chosen"]
    exported = AutoTokenizer.from_pretrained(str(run / "export-hf"))
    source = AutoTokenizer.from_pretrained(str(chat[0]))
    assert exported.apply_chat_template(msgs, tokenize=False) == \
        source.apply_chat_template(msgs, tokenize=False)


def _lora_args(chat, root, objective: str) -> list[str]:
    """The arguments of a 3-step LoRA run of `objective`: DPO on the pairs, or chat SFT
    ("lm") on their prompt + chosen conversations."""
    _, data = chat
    args = [*data, *TRAIN, *LORA, "--train.steps=3", f"--train.objective={objective}"]
    if objective == "dpo":
        args += ["--dpo.beta=0.5"]
    if objective == "lm":
        msgs = [r["prompt"] + r["chosen"] for r in preference_records(40)]
        (src := root / "sft.jsonl").write_text(
            "".join(json.dumps({"messages": m}) + "\n" for m in msgs))
        args += [f"--data.source={src}"]
    return args


@pytest.fixture(scope="module")
def one_process_lora(chat, tmp_path_factory):
    """objective -> (its arguments, the one-process run), each run once per module."""
    runs = {}

    def get(objective: str):
        if objective not in runs:
            root = tmp_path_factory.mktemp(f"one-{objective}")
            args = _lora_args(chat, root, objective)
            proc = run_cli("train", *args, f"--run.dir={root / 'one'}")
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[objective] = args, root / "one"
        return runs[objective]
    return get


@pytest.mark.parametrize("objective", ["dpo", "lm"])
def test_lora_on_two_ddp_processes_equals_one_process(one_process_lora, tmp_path, objective):
    """The adapters' gradients are all-reduced (DDP collects its parameters at the first
    forward, after LoRA): every step's loss (and DPO's margin) equals one process's."""
    args, one = one_process_lora(objective)
    two = tmp_path / "two"
    proc = run_cli("train", *args, f"--run.dir={two}", *DDP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_records(one), train_records(two)
    assert len(a) == 3
    for key in ("loss", "dpo_reward_margin") if objective == "dpo" else ("loss",):
        x, y = [r[key] for r in a], [r[key] for r in b]
        assert np.allclose(x, y, rtol=1e-5, atol=1e-7), (key, x, y)
    assert a[-1]["loss"] != a[0]["loss"]  # it trained: step 3 saw reduced updates


REWARDS = ("dpo_reward_margin", "dpo_chosen_reward", "dpo_rejected_reward")


@pytest.mark.parametrize("objective", ["dpo", "lm"])
def test_lora_on_two_fsdp2_processes_equals_one_process(one_process_lora, tmp_path, objective):
    """LoRA under FSDP2 (`--nproc 2 --parallel.dp_shard=2`): fully_shard shards the
    adapters with their block and reduce-scatters their gradients. DPO's reference is
    the sharded policy with its adapters off (no copy): were it the policy itself, every
    margin would stay 0 and the loss log 2; were it not the base, step 1 would not be
    log 2. Chat SFT normalises by the global count of trained (assistant) tokens."""
    args, one = one_process_lora(objective)
    two = tmp_path / "two"
    proc = run_cli("train", *args, f"--run.dir={two}", *FSDP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["parallel"]["strategy"] == "fsdp" and summary["parallel"]["dp_shard"] == 2
    a, b = train_records(one), train_records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["tokens"] == x["tokens"]  # the global pairs / trained tokens
        # fp32, the same sums in another order: the losses <= 2e-7 relative apart here.
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x["step"], x, y)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x["step"], x, y)
        if objective == "dpo":
            assert y["dpo_accuracy"] == x["dpo_accuracy"], (x["step"], x, y)
            # A reward is beta x a difference of summed log-probs (tens in magnitude):
            # its summation-order noise is absolute (tests/distributed/test_dpo_parallel.py).
            for k in REWARDS:
                assert y[k] == pytest.approx(x[k], rel=1e-6, abs=1e-6), (x["step"], k, x, y)
    if objective == "dpo":
        assert b[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
        assert b[0]["dpo_reward_margin"] == 0.0 and b[-1]["dpo_reward_margin"] != 0.0
    assert a[-1]["loss"] != a[0]["loss"]
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wb and set(wa) == set(wb) and all(k.endswith((".lora_A", ".lora_B")) for k in wb)
    for k in wa:  # the same adapters (Adam on fp32 noise: 1e-4 absolute)
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4), k


def test_implicit_prompt_records_train_as_the_explicit_ones(one_process_lora, tmp_path):
    """TRL's implicit-prompt form (only `chosen` / `rejected`, each the whole
    conversation; the prompt their shared leading messages) through the CLI: the same
    pairs, so the same losses and rewards as the explicit records, bit for bit."""
    args, one = one_process_lora("dpo")
    (src := tmp_path / "implicit.jsonl").write_text("".join(
        json.dumps({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
        + "\n" for r in preference_records(40)))
    run = tmp_path / "run"
    proc = run_cli("train", *args, f"--data.source={src}",
                   f"--data.prepared_dir={tmp_path / 'prep'}", f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ("step", "loss", "tokens", "dpo_reward_margin", "dpo_accuracy")
    assert [[r[k] for k in keys] for r in train_records(run)] == \
        [[r[k] for k in keys] for r in train_records(one)]


@pytest.mark.parametrize("extra, fragment", [
    (["--data.train_on=all"], "data.train_on='all' is not supported with "
     "train.objective='dpo'"),
    (["BAD"], "a response is the assistant's turn(s) only"),
])
def test_bad_chat_dpo_input_is_one_line(chat, tmp_path, extra, fragment):
    _, data = chat
    if extra == ["BAD"]:
        rec = preference_records(1)[0]
        rec["chosen"] = [{"role": "user", "content": "hi"}]
        (src := tmp_path / "bad.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [*preference_records(5), rec]))
        extra = [f"--data.source={src}", f"--data.prepared_dir={tmp_path / 'p'}"]
    run = tmp_path / "run"
    one_error_line(run_cli("train", *data, *TRAIN, *extra, f"--run.dir={run}"), fragment)
    assert not run.exists() or not any(run.iterdir())
