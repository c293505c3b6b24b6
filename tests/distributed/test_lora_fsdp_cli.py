"""LoRA and finetune.freeze under FSDP2 through the CLI, as users run them (issue 18):
`--nproc 2 --parallel.dp_shard=2` gives the one-process losses at every step, trains
only the adapters (or the unfrozen weights), leaves the base untouched, resumes exactly,
and its checkpoint exports as the merged model. The converters run on the meta model
before fully_shard (parallel/parallelize.py `build_parallel_model(convert=)`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaletrain.finetune.lora import merge_adapter_state
from tests.conftest import TINY_DATA, TINY_GPT, run_cli

pytestmark = pytest.mark.timeout(600)

RANK, ALPHA = 4, 8.0
# A constant LR: a stopped run's schedule must not depend on its train.steps.
TRAIN = [*TINY_DATA, *TINY_GPT, "--schedule.name=constant", "--optim.lr=1e-2",
         "--train.threads=1", "--eval.test=false"]
LORA = [f"--finetune.lora_rank={RANK}", f"--finetune.lora_alpha={ALPHA}"]
FREEZE = ['--finetune.freeze=["wte.*","wpe.*","blocks.0.*"]']
FSDP = ["--nproc=2", "--parallel.dp_shard=2"]


def train(*args: str) -> None:
    proc = run_cli("train", *TRAIN, *args, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train_records(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


def assert_same_curve(a: list[dict], b: list[dict], steps: int) -> None:
    """fp32: one process and two FSDP2 ranks sum gradients in another order; measured
    here the losses differ by <= 2e-7 relative over 10 steps, 1e-6 leaves that margin."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x["step"], x, y)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x["step"], x, y)


@pytest.fixture(scope="module")
def base(prepared_dir, tmp_path_factory) -> Path:
    """A two-step tiny GPT run: the init.from of every run below."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(f"--data.prepared_dir={prepared_dir}", f"--run.dir={run}", "--train.steps=2")
    return run


@pytest.fixture(scope="module")
def lora_runs(base, prepared_dir, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(one process, two FSDP2 ranks, their arguments): 10 LoRA steps, checkpoints every 5."""
    root = tmp_path_factory.mktemp("lora")
    args = [f"--data.prepared_dir={prepared_dir}", f"--init.from={base}", *LORA,
            "--train.steps=10", "--checkpoint.interval=5"]
    train(*args, f"--run.dir={root / 'one'}")
    train(*args, f"--run.dir={root / 'two'}", *FSDP)
    return root / "one", root / "two", args


def test_lora_on_two_fsdp2_ranks_equals_one_process(lora_runs):
    one, two, _ = lora_runs
    a, b = train_records(one), train_records(two)
    assert_same_curve(a, b, 10)
    assert a[-1]["loss"] != a[0]["loss"]  # the adapters moved: later steps saw updates
    summary = json.loads((two / "summary.json").read_text())
    assert summary["parallel"]["strategy"] == "fsdp" and summary["parallel"]["dp_shard"] == 2
    # Only the adapters are saved, the same ones (Adam on fp32 noise: 1e-4 absolute).
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wb and set(wa) == set(wb) and all(k.endswith((".lora_A", ".lora_B")) for k in wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4), k
    assert all(wb[k].abs().max() > 0 for k in wb if k.endswith(".lora_B"))  # B trained


def test_the_fsdp2_lora_checkpoint_holds_the_untouched_base_and_exports_merged(lora_runs, base,
                                                                               tmp_path):
    """Exported from its newest DCP checkpoint (step 10, sharded over 2 ranks) and from
    its final adapters, the run is W0 + (alpha/r) B A with W0 init.from's weights bit
    for bit: the frozen base was neither trained nor lost in the sharded checkpoint."""
    _, two, _ = lora_runs
    for weights in ("checkpoint", "final"):
        proc = run_cli("export", str(two), "--weights", weights,
                       "--out", str(tmp_path / weights), timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = load_file(str(base / "model.safetensors"))
    adapters = load_file(str(two / "model.safetensors"))
    want = merge_adapter_state(w0, adapters, RANK, ALPHA)
    for weights in ("checkpoint", "final"):
        got = load_file(str(tmp_path / weights / "model.safetensors"))
        assert set(got) == set(want), weights
        for k in want:
            assert torch.equal(got[k], want[k]), (weights, k)
    moved = [k for k in want if not torch.equal(want[k], w0[k])]
    assert moved and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                         for k in moved), moved


def test_a_stopped_and_resumed_fsdp2_lora_run_continues_the_same_curve(lora_runs, tmp_path):
    one, _, args = lora_runs
    res = tmp_path / "resumed"
    train(*args, f"--run.dir={res}", *FSDP, "--train.steps=5")
    assert len(train_records(res)) == 5
    train(*args, f"--run.dir={res}", *FSDP)  # resumes run.dir in place from step 5
    assert_same_curve(train_records(one), train_records(res), 10)


def test_freeze_on_two_fsdp2_ranks_equals_one_process(base, prepared_dir, tmp_path):
    args = [f"--data.prepared_dir={prepared_dir}", f"--init.from={base}", *FREEZE,
            "--train.steps=6"]
    train(*args, f"--run.dir={tmp_path / 'one'}")
    train(*args, f"--run.dir={tmp_path / 'two'}", *FSDP)
    assert_same_curve(train_records(tmp_path / "one"), train_records(tmp_path / "two"), 6)
    w0 = load_file(str(base / "model.safetensors"))
    wa = load_file(str(tmp_path / "one" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert set(wb) == set(w0)
    frozen = [k for k in w0 if k.startswith(("wte.", "wpe.", "blocks.0."))]
    assert frozen and all(torch.equal(wb[k], w0[k]) for k in frozen)
    trained = [k for k in w0 if k not in frozen]
    assert all(not torch.equal(wb[k], w0[k]) for k in trained if k.endswith("weight"))
    for k in w0:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4), k
