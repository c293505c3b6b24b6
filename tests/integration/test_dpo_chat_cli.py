"""DPO on chat-shaped preference records through the CLI (issue #18): an imported HF Qwen2
directory, its chat template, LoRA (the reference is the base with the adapters off);
the same run on two DDP processes equals one process; LoRA chat SFT on two DDP
processes equals one process; bad input is one line, exit 2, before anything is written."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
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


@pytest.mark.parametrize("objective", ["dpo", "lm"])
def test_lora_on_two_ddp_processes_equals_one_process(chat, tmp_path, objective):
    """The adapters' gradients are all-reduced (DDP collects its parameters at the first
    forward, after LoRA): every step's loss (and DPO's margin) equals one process's."""
    _, data = chat
    args = [*data, *TRAIN, *LORA, "--train.steps=3", f"--train.objective={objective}"]
    if objective == "dpo":
        args += ["--dpo.beta=0.5"]
    if objective == "lm":  # chat SFT on the prompt + chosen conversations
        msgs = [r["prompt"] + r["chosen"] for r in preference_records(40)]
        (src := tmp_path / "sft.jsonl").write_text(
            "".join(json.dumps({"messages": m}) + "\n" for m in msgs))
        args += [f"--data.source={src}"]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli("train", *args, f"--run.dir={one}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("train", *args, f"--run.dir={two}", *DDP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_records(one), train_records(two)
    assert len(a) == 3
    for key in ("loss", "dpo_reward_margin") if objective == "dpo" else ("loss",):
        x, y = [r[key] for r in a], [r[key] for r in b]
        assert np.allclose(x, y, rtol=1e-5, atol=1e-7), (key, x, y)
    assert a[-1]["loss"] != a[0]["loss"]  # it trained: step 3 saw reduced updates


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
