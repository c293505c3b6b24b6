"""After training, end to end through the CLI: LoRA fine-tuning from a run, HF import,
distillation, compress (prune + quantize + report) and generate on every artefact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_DATA, TINY_GPT, make_cfg, run_cli


def _args(prepared_dir, run_dir, data=TINY_DATA):
    return data + TINY_GPT + [f"--data.prepared_dir={prepared_dir}", f"--run.dir={run_dir}"]


def _records(run_dir, kind="eval"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def base_run(prepared_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "run"
    proc = run_cli("train", *_args(prepared_dir, d), "--train.steps=40", "--optim.lr=3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def other_source(tmp_path_factory):
    """A different text source: English prose, not Python."""
    d = tmp_path_factory.mktemp("prose")
    words = ("the cat sat on a mat while the dog ran to the park and a bird sang in the "
             "tree near the old house by the river").split()
    for i in range(24):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(400))
        (d / f"doc{i}.txt").write_text(text + "\n")
    return d


def test_lora_finetune_on_another_source(base_run, other_source, prepared_dir, tmp_path):
    d = tmp_path / "lora"
    data = [f"--data.source={other_source}", "--data.prep_workers=1"]
    proc = run_cli("train", *_args(prepared_dir, d, data), f"--init.from={base_run}",
                   "--finetune.lora_rank=2", "--finetune.lora_targets=c_attn,c_fc",
                   "--train.steps=20", "--eval.interval=20", "--optim.lr=3e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r["loss"] for r in _records(d) if r["split"] == "val"]
    assert evals[-1] < evals[0] - 0.03  # step 0 = the base model on the new source
    from safetensors.torch import load_file

    saved = load_file(str(d / "model.safetensors"))
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved)
    assert (d / "tokenizer.json").read_text() == (base_run / "tokenizer.json").read_text()

    from scaletrain.compress.artefact import load_artefact
    from scaletrain.finetune.lora import has_lora, merge_lora, trainable_fraction

    _, model, _ = load_artefact(d, which="final")
    assert has_lora(model)
    # apply_lora froze the base and left the adapters trainable, as in training
    train, total = trainable_fraction(model)
    assert train / total < 0.05
    x = torch.randint(0, 384, (2, 32))
    # Compared in fp64: x·W + s·(x·A)·B and x·(W + s·B·A) round differently in fp32 by up
    # to ~5e-5 on these logits (seen under load), which would hide nothing but flake;
    # in fp64 only the fp32 rounding of the merged weights (~1e-7 relative) remains.
    with torch.no_grad():
        before = model.double()(x)
    # `export` merges the adapters: a plain model with the same logits, in either format.
    from scaletrain.cli import main

    for fmt in ("safetensors", "hf"):
        assert main(["export", str(d), "--format", fmt, "--weights", "final",
                     "--out", str(tmp_path / fmt)]) == 0
        _, exported, _ = load_artefact(tmp_path / fmt)
        assert not has_lora(exported)
        with torch.no_grad():
            torch.testing.assert_close(exported.double()(x), before, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(model)(x), before, atol=1e-5, rtol=0)


def test_hf_directory_as_init_from(prepared_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=400, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0)).save_pretrained(hf)
    d = tmp_path / "ft"
    # The shape comes from the source: a differing --model.n_layer would be refused.
    args = [a for a in _args(prepared_dir, d) if not a.startswith("--model.n_layer")]
    proc = run_cli("train", *args, f"--init.from={hf}", "--train.steps=2",
                   "--eval.interval=1", "--eval.test=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "n_layer = 1" in (d / "config.toml").read_text()  # model from the source
    # The step-0 evaluation is the HF model itself on the same validation batches.
    from scaletrain.compress.artefact import load_artefact
    from scaletrain.compress.report import val_loss
    from scaletrain.data.build import build_data

    cfg = make_cfg(_args(prepared_dir, d))
    _, model, _ = load_artefact(hf)
    expect = val_loss(model, build_data(cfg, progress=False).val, cfg.eval.batch_size,
                      cfg.eval.batches)
    step0 = _records(d)[0]
    assert step0["step"] == 0 and abs(step0["loss"] - expect) < 1e-5


def test_distillation_hook(base_run, prepared_dir, tmp_path):
    losses = {}
    for name, extra in [("plain", []),
                        ("alpha0", [f"--distill.teacher={base_run}", "--distill.alpha=0"]),
                        ("kd", [f"--distill.teacher={base_run}", "--distill.alpha=0.5"])]:
        d = tmp_path / name
        proc = run_cli("train", *_args(prepared_dir, d), "--model.n_layer=1",
                       "--train.steps=3", "--eval.test=false", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = [r["loss"] for r in _records(d, "train")]
    assert losses["alpha0"] == losses["plain"]  # alpha = 0: exactly the data loss
    assert losses["kd"] != losses["plain"]


def test_compress_report_and_generate_every_artefact(base_run, tmp_path, capsys):
    out = tmp_path / "c"
    proc = run_cli("compress", str(base_run), f"--compress.out={out}",
                   "--prune.method=structured", "--prune.amount=0.5",
                   "--prune.finetune_steps=2", "--quant.methods=dynamic-int8,weight-int4",
                   "--compress.eval_batches=2", "--compress.gen_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quant-dynamic-int8" in proc.stdout and (out / "report.png").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"original", "pruned-structured-0.5", "quant-dynamic-int8",
                         "quant-weight-int4"}
    orig = rows["original"]
    assert rows["pruned-structured-0.5"]["params"] == report["structured"]["claimed_params"]
    assert rows["pruned-structured-0.5"]["params"] < orig["params"]
    assert orig["size_mb"] / rows["quant-dynamic-int8"]["size_mb"] > 3
    assert orig["size_mb"] / rows["quant-weight-int4"]["size_mb"] > 4
    assert rows["quant-dynamic-int8"]["params"] == orig["params"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and abs(r["val_loss"] - orig["val_loss"]) < 0.5
    from scaletrain.cli import main

    for name in ("original", *sorted(set(rows) - {"original"})):  # in-process: no start-up
        target = base_run if name == "original" else out / name
        assert main(["generate", str(target), "--generate.num_samples=1",
                     "--generate.max_new_tokens=6", "--generate.temperature=0"]) == 0
        assert "--- sample 1" in capsys.readouterr().out
    assert main(["eval", str(out / "quant-dynamic-int8")]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] < orig["val_loss"] + 0.5


def test_compress_user_errors(base_run, tmp_path):
    proc = run_cli("compress", str(base_run))
    assert proc.returncode == 2 and "nothing to do" in proc.stderr
    proc = run_cli("compress", str(base_run), "--quant.methods=int3")
    assert proc.returncode == 2 and "quant.methods" in proc.stderr
    proc = run_cli("train", f"--init.from={tmp_path}/nope", f"--run.dir={tmp_path}/r")
    assert proc.returncode == 2 and "init.from" in proc.stderr


def test_compress_of_a_lora_run_compares_with_the_merged_model(base_run, prepared_dir,
                                                               tmp_path):
    """Issue 13 item 8: the baseline is the merged model, not the adapter file."""
    lora = tmp_path / "lora"
    no_shape = [a for a in TINY_GPT if not a.startswith("--model.")]  # from init.from
    proc = run_cli("train", *TINY_DATA, *no_shape, f"--data.prepared_dir={prepared_dir}",
                   f"--run.dir={lora}", f"--init.from={base_run}", "--finetune.lora_rank=2",
                   "--train.steps=2", "--eval.test=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "c"
    proc = run_cli("compress", str(lora), f"--compress.out={out}", "--quant.methods=weight-int8",
                   "--compress.eval_batches=1", "--compress.gen_tokens=4",
                   "--compress.gen_repeats=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    orig, quant = report["rows"]
    merged = out / "original-merged" / "model.safetensors"
    assert orig["name"] == "original-merged" and orig["path"] == str(merged)
    assert orig["size_mb"] == merged.stat().st_size / 2**20
    adapters = (lora / "model.safetensors").stat().st_size / 2**20
    assert orig["size_mb"] > 10 * adapters
    assert 2 < orig["size_mb"] / quant["size_mb"] < 5  # fp32 -> int8 + scales
    assert "median of 2" in report["gen_speed"]


def test_generation_speed_is_a_median_after_an_untimed_warm_up(monkeypatch):
    """Every model first decodes the timed length once, untimed, then `rounds` timed
    calls round-robin; its speed is their median. The clock is fake: each call "takes"
    the next of its model's durations, the first (the cold one) far the slowest."""
    from types import SimpleNamespace

    import scaletrain.generate
    from scaletrain.compress import report

    durations = {"a": [500.0, 4.0, 1.0, 100.0], "b": [900.0, 2.0, 8.0, 1.0]}
    now, calls = [0.0], []

    def fake_sample(model, prompt, max_new_tokens, **_):
        calls.append((model, max_new_tokens))
        now[0] += durations[model].pop(0)
        return [0] * max_new_tokens

    monkeypatch.setattr(scaletrain.generate, "sample", fake_sample)
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    speeds = report.generation_speeds(["a", "b"], [1], tokens=8, seq_len=32, rounds=3)
    assert calls == [("a", 8), ("b", 8)] + [("a", 8), ("b", 8)] * 3  # warm-up, then rounds
    assert speeds == [8 / 4.0, 8 / 2.0]  # medians of 8/d over the timed calls only
