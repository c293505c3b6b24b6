"""Hugging Face in and out for the llama family (issue #15): transformers' Llama / Qwen2 /
Qwen3 / Mistral directories load with equal logits and greedy tokens, train through
init.from, export back, and bad directories are refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_DATA, make_cfg, one_error_line, run_cli
from tests.hf_dirs import EOS, VOCAB, hf_model_dir
from scaletrain.compress.artefact import load_artefact
from scaletrain.generate import sample

transformers = pytest.importorskip("transformers")  # pinned in requirements.txt

# (architecture, extra config, save shard size): GQA, tied / untied, q/k/v bias,
# qk-norm with head_dim != d_model / n_head, llama3 rope scaling, sharded and single-file.
CASES = {
    "llama": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "20KB"),
    "qwen2": ("Qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True), "5GB"),
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
              "30KB"),
    "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=None,
                                tie_word_embeddings=True), "5GB"),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (directory, the transformers model): one build per architecture."""
    root = tmp_path_factory.mktemp("llama_hf")
    out = {}
    for name, (arch, extra, shard) in CASES.items():
        cfg = dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_theta=50000.0, **extra)
        if arch == "Qwen2":
            cfg["attention_bias"] = True  # where the q/k/v biases live (always on)
        d = root / name
        out[name] = (d, hf_model_dir(d, arch, cfg, shard,
                                     init=_random_biases if arch == "Qwen2" else None))
    return out


def _random_biases(model) -> None:
    """Random biases, so a dropped bias shows in the logits."""
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_tokens_equal_transformers(hf_dirs, name):
    d, hf = hf_dirs[name]
    assert (d / "model.safetensors.index.json").is_file() == (CASES[name][2] != "5GB")
    cfg, model, tok = load_artefact(d)
    assert cfg.model.name == "llama" and cfg.model.hf_architecture == f"{CASES[name][0]}ForCausalLM"
    assert tok is not None and tok.eot_id == 1  # the directory's <|end_of_text|>
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[0, :8].tolist()
    ours = sample(model, prompt, max_new_tokens=32, seq_len=64, temperature=0.0)
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                         min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, 8:].tolist()


def test_generate_cli_matches_transformers_greedy(hf_dirs):
    d, hf = hf_dirs["qwen3"]
    _, _, tok = load_artefact(d)
    prompt = "import os\n"
    proc = run_cli("generate", str(d), f"--generate.prompt={prompt}", "--generate.num_samples=1",
                   "--generate.temperature=0", "--generate.max_new_tokens=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = tok.encode(prompt)
    new = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                      eos_token_id=tok.eot_id, pad_token_id=0)[0, len(ids):].tolist()
    new = new[:new.index(tok.eot_id)] if tok.eot_id in new else new
    assert proc.stdout.split("--- sample 1 ---\n", 1)[1] == prompt + tok.decode(new) + "\n"


def test_init_from_trains_then_exports_back(hf_dirs, tmp_path):
    """init.from an HF llama (sharded, untied, rope scaling) through the CLI: the run
    takes the directory's tokenizer, its step-0 loss is the HF model's, a few steps
    train, and the export is a LlamaForCausalLM transformers loads with equal logits."""
    d, hf = hf_dirs["llama"]
    run = tmp_path / "run"
    args = [*TINY_DATA, f"--data.prepared_dir={tmp_path / 'prep'}", f"--run.dir={run}",
            f"--init.from={d}", "--model.seq_len=32", "--train.steps=3", "--train.batch_size=4",
            "--train.progress=off", "--eval.interval=0", "--eval.test=false",
            "--optim.lr=1e-3", "--schedule.warmup_steps=0"]
    proc = run_cli("train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = (run / "config.toml").read_text()
    assert 'name = "llama"' in saved and 'hf_architecture = "LlamaForCausalLM"' in saved
    assert json.loads((run / "tokenizer.json").read_text()) == json.loads(
        (d / "tokenizer.json").read_text())
    out = tmp_path / "hf-out"
    proc = run_cli("export", str(run), "--format", "hf", "--out", str(out),
                   "--max-shard-size", "40KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"]["rope_type"] == "llama3"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _, trained, _ = load_artefact(run)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, trained(ids), atol=1e-5, rtol=0)
        assert (back(ids).logits - hf(ids).logits).abs().max() > 1e-4  # it did train
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == EOS
    proc = run_cli("eval", str(d), *TINY_DATA, f"--data.prepared_dir={tmp_path / 'prep'}",
                   "--model.seq_len=32")  # the HF directory itself, its own tokenizer
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert abs(json.loads(proc.stdout)["loss"] - torch.log(torch.tensor(VOCAB)).item()) < 1.0


@pytest.mark.parametrize("name, layout", [
    ("qwen3", ["--parallel.dp_shard=2"]),
    # pp=2 with a tied head: the last stage holds no embedding, only its copy of it
    ("mistral", ["--parallel.pp=2", "--parallel.dp_shard=1", "--train.micro_batch_size=2"]),
])
def test_sharded_ranks_load_their_slices(hf_dirs, tmp_path, name, layout):
    """Two ranks each read their own part of the checkpoint, FSDP2 slices (sharded
    index) or one pipeline stage each (single file, tied head): the step-0 validation
    loss is the HF model's, computed in one process."""
    from scaletrain.compress.report import val_loss
    from scaletrain.data.build import build_data

    d, _ = hf_dirs[name]
    run = tmp_path / "run"
    args = [*TINY_DATA, f"--data.prepared_dir={tmp_path / 'prep'}", f"--run.dir={run}",
            f"--init.from={d}", "--model.seq_len=32", "--train.batch_size=4",
            "--eval.batches=2", "--eval.batch_size=4", "--eval.test=false"]
    proc = run_cli("train", *args, "--nproc=2", *layout, "--train.steps=1",
                   "--eval.interval=1", "--train.progress=off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step0 = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"][0]
    cfg = make_cfg([a for a in args if not a.startswith(("--init.from", "--run.dir"))]
                   + [f"--data.tokenizer={d / 'tokenizer.json'}"])
    assert cfg.model.seq_len == 32 and "seq_len = 32" in (run / "config.toml").read_text()
    _, model, _ = load_artefact(d, [("model.seq_len", "32")])
    expect = val_loss(model, build_data(cfg, progress=False).val, 4, 2)
    assert step0["step"] == 0 and abs(step0["loss"] - expect) < 1e-5, (step0, expect)


def test_bad_hf_directories_exit_2_before_writing(hf_dirs, tmp_path):
    """Unsupported architecture, config.json disagreeing with the safetensors, a shard
    in the index missing: one line each, exit 2, no run directory."""
    import shutil

    src = hf_dirs["llama"][0]
    cases = {}
    for case in ("arch", "shape", "shard"):
        d = tmp_path / case
        shutil.copytree(src, d)
        c = json.loads((d / "config.json").read_text())
        if case == "arch":
            c["architectures"] = ["GemmaForCausalLM"]
        if case == "shape":
            c["intermediate_size"] = 128
        (d / "config.json").write_text(json.dumps(c))
        if case == "shard":
            (d / "model-00002-of-00014.safetensors").unlink()
        cases[case] = d
    expect = {"arch": ("GemmaForCausalLM", "LlamaForCausalLM, Qwen2ForCausalLM"),
              "shape": ("mlp.gate_proj.weight", "config.json implies [128, 64]"),
              "shard": ("model-00002-of-00014.safetensors", "missing")}
    for case, d in cases.items():
        run = tmp_path / f"run-{case}"
        proc = run_cli("train", *TINY_DATA, f"--init.from={d}", f"--run.dir={run}",
                       f"--data.prepared_dir={tmp_path / 'prep'}", "--train.steps=1")
        one_error_line(proc, *expect[case])
        assert not run.exists()


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])
def test_config_naming_only_its_model_type_reads_as_that_architecture(hf_dirs, tmp_path,
                                                                      name):
    """An older config.json with no "architectures" is read by its model_type (HFMap
    .model_types): Qwen2's q/k/v biases, Qwen3's q/k norms, Mistral's window rules —
    logits equal transformers', and the export would write the same class."""
    import shutil

    d, hf = hf_dirs[name]
    copy = tmp_path / name
    shutil.copytree(d, copy)
    c = json.loads((copy / "config.json").read_text())
    del c["architectures"]
    (copy / "config.json").write_text(json.dumps(c))
    cfg, model, _ = load_artefact(copy)
    assert cfg.model.hf_architecture == f"{CASES[name][0]}ForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])
def test_export_writes_the_family_it_came_from(hf_dirs, tmp_path, name):
    """Qwen2 / Qwen3 / Mistral read in and written out (checkpoint/hf_export.py, as
    `export --format hf` does) are again that class — its config.json, model_type and
    tensors (biases, q/k norms, tied head stored once) — and transformers loads them with
    logits equal to the source's; the tokenizer files come along."""
    from scaletrain.checkpoint.hf_export import export_hf

    d, hf = hf_dirs[name]
    cfg, model, tok = load_artefact(d)
    out = tmp_path / "out"
    export_hf(cfg, model, tok, out, max_shard_bytes=30_000)
    arch = f"{CASES[name][0]}ForCausalLM"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["model_type"] == json.loads((d / "config.json").read_text())["model_type"]
    assert (out / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == arch
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == EOS


def test_head_counts_that_do_not_group_exit_2_before_writing(hf_dirs, tmp_path):
    """n_head not a multiple of n_kv_head, on the command line and in an HF
    config.json: one line naming the fields (and the file), exit 2, no run directory."""
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(hf_dirs["llama"][0], d)
    c = json.loads((d / "config.json").read_text())
    c["num_key_value_heads"] = 3
    (d / "config.json").write_text(json.dumps(c))
    common = [*TINY_DATA, f"--data.prepared_dir={tmp_path / 'prep'}", "--train.steps=1"]
    run = tmp_path / "run-cli"
    proc = run_cli("train", *common, "--model.name=llama", "--model.n_head=4",
                   "--model.n_kv_head=3", f"--run.dir={run}")
    one_error_line(proc, "model.n_head=4 must be a multiple of model.n_kv_head=3")
    assert not run.exists()
    run = tmp_path / "run-hf"
    proc = run_cli("train", *common, f"--init.from={d}", f"--run.dir={run}")
    one_error_line(proc, str(d / "config.json"), "must be a multiple of model.n_kv_head=3")
    assert not run.exists()
