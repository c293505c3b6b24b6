"""Chat SFT through the CLI, as users run it (issue #18): an imported HF Qwen2 model
fine-tuned with LoRA on chat JSONL, whose first loss is the HF model's cross-entropy on
the assistant tokens alone; FSDP2 on two processes equal to one process; bad records and
templates exit 2 with one line before anything trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.chat_dirs import qwen_dir, random_conversations, write_jsonl
from tests.conftest import make_cfg, one_error_line, run_cli
from scaletrain.data.build import build_data
from scaletrain.data.loader import StatefulLoader
from scaletrain.models.losses import IGNORE_INDEX

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

TRAIN = ["--model.seq_len=128", "--train.batch_size=4", "--train.progress=off",
         "--train.log_interval=1", "--eval.interval=0", "--eval.batches=2",
         "--eval.batch_size=4", "--eval.test=false", "--schedule.warmup_steps=0",
         "--optim.lr=1e-2", "--train.threads=1"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(HF directory, its transformers model, the data arguments)."""
    root = tmp_path_factory.mktemp("chat_sft")
    d, model = qwen_dir(root / "qwen")
    src = write_jsonl(root / "data" / "chat.jsonl", random_conversations(60))
    return d, model, [f"--data.source={src}", "--data.format=chat",
                      f"--data.prepared_dir={root / 'prep'}", "--data.val_fraction=0.1",
                      "--data.test_fraction=0"]


def _train_losses(run) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def _hf_first_loss(chat, extra: list[str]) -> float:
    """The HF model's mean cross-entropy over the trained targets of the run's first
    batch (the loader's seeded order), computed without scaletrain's model or loss."""
    d, hf, data_args = chat
    cfg = make_cfg([*data_args, *TRAIN, *extra, f"--data.tokenizer={d / 'tokenizer.json'}"])
    data = build_data(cfg, progress=False)
    x, y = next(StatefulLoader(data.train, cfg.train.batch_size, seed=cfg.train.seed,
                               shuffle=cfg.data.shuffle))
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    with torch.no_grad():
        logits = hf(x).logits.double()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX).item()


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_lora_chat_sft_first_loss_is_the_hf_models(chat, tmp_path, train_on):
    """init.from the HF directory + LoRA: the run takes the directory's chat template;
    step 1's loss (adapters start at zero: the base model) is the HF model's loss on
    exactly the tokens `train_on` names; only the adapters are saved; the loss falls."""
    d, _, data_args = chat
    run = tmp_path / "run"
    extra = [f"--data.train_on={train_on}"]
    proc = run_cli("train", *data_args, *TRAIN, *extra, f"--run.dir={run}",
                   f"--init.from={d}", "--finetune.lora_rank=4",
                   "--finetune.lora_targets=q_proj,v_proj,o_proj,down_proj",
                   "--finetune.lora_alpha=8", "--train.steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _train_losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert losses[0] == pytest.approx(_hf_first_loss(chat, extra), rel=1e-5)
    from safetensors import safe_open
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert f.keys() and all(k.endswith((".lora_A", ".lora_B")) for k in f.keys())


def test_fsdp2_on_two_processes_and_a_resume_equal_one_process(chat, tmp_path):
    """Packed conversations with document masking: the losses of --nproc 2 (FSDP2,
    dp_shard=2) equal one process's at every step (the global count of trained targets
    normalises both), and so do those of a run stopped and resumed."""
    d, _, data_args = chat
    # A constant LR: the stopped run's schedule must not depend on its train.steps.
    args = [*data_args, *TRAIN, f"--init.from={d}", "--data.document_masking=true",
            "--train.steps=3", "--schedule.name=constant"]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli("train", *args, f"--run.dir={one}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("train", *args, f"--run.dir={two}", "--nproc=2", "--parallel.dp_shard=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _train_losses(one), _train_losses(two)
    assert len(a) == 3 and np.allclose(a, b, rtol=1e-5, atol=0), (a, b)
    # Stopped after step 2 and resumed: the run renders with its own copy of the
    # template (init.from is not read again) and continues the same curve.
    res = tmp_path / "resumed"
    proc = run_cli("train", *args, f"--run.dir={res}", "--train.steps=2",
                   "--checkpoint.interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (res / "tokenizer_config.json").is_file()
    proc = run_cli("train", *args, f"--run.dir={res}", "--checkpoint.interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.allclose(_train_losses(res), a, rtol=1e-6, atol=0), (_train_losses(res), a)


def test_bad_chat_input_exits_2_with_one_line(chat, tmp_path):
    d, _, data_args = chat
    base = [*TRAIN, f"--init.from={d}", "--data.format=chat", "--train.steps=1",
            f"--data.prepared_dir={tmp_path / 'prep'}", "--data.val_fraction=0.1",
            "--data.test_fraction=0"]
    good = random_conversations(6)
    cases = {
        "no-messages": (good + [{"text": "hi"}], [], ["chat.jsonl:7", "'messages'"]),
        "role": (good + [[{"role": "tool", "content": "x"}]], [],
                 ["chat.jsonl:7", "rejects the conversation", "Unknown role: tool"]),
    }
    for name, (recs, extra, frags) in cases.items():
        src = tmp_path / name / "chat.jsonl"
        src.parent.mkdir()
        src.write_text("".join(json.dumps(r if isinstance(r, dict) else {"messages": r})
                               + "\n" for r in recs))
        run = tmp_path / f"run-{name}"
        one_error_line(run_cli("train", *base, *extra, f"--data.source={src}",
                               f"--run.dir={run}"), *frags)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages[0]['content'] + 1 }}")
    one_error_line(run_cli("train", *base, f"--data.source={tmp_path / 'role'}",
                           f"--data.chat_template={bad}", f"--run.dir={tmp_path / 'r3'}"),
                   "chat.jsonl:1", "chat template fails to render")
    # No template: refused by the launcher, before any run directory exists.
    bare, _ = qwen_dir(tmp_path / "bare", template=None)
    run = tmp_path / "r4"
    one_error_line(run_cli("train", *[a for a in base if not a.startswith("--init.from")],
                           f"--init.from={bare}", f"--data.source={tmp_path / 'role'}",
                           f"--run.dir={run}", "--nproc=2"),
                   "no chat template", "data.chat_template")
    assert not run.exists()
