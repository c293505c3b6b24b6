"""Loading weights skips the random init (issue #15): `train --init.from` a run
directory or export, and `eval` / `generate` of a run or a Hugging Face directory, build
the model without drawing its init (models/registry.py `materialize(init=False)`)
because their loaders write every tensor or refuse. So the loaded model is the stored
tensors bit for bit, and a source missing one tensor is exit 2, never a model with a
stretch of uninitialised memory in it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_DATA, make_cfg, one_error_line, run_cli
from scaletrain.checkpoint.run_model import load_weights
from scaletrain.compress.artefact import load_artefact
from scaletrain.models.registry import build_model, spec_of

pytestmark = pytest.mark.timeout(300)

# A llama with q/k/v biases and an untied head, trained a few steps: every tensor
# (biases, norms included) is away from its init value.
LLAMA = ["--model.name=llama", "--model.n_layer=2", "--model.n_head=2", "--model.n_kv_head=1",
         "--model.d_model=32", "--model.seq_len=32", "--model.qkv_bias=true",
         "--model.tie_embeddings=false", "--train.batch_size=8", "--train.progress=off",
         "--eval.batches=2", "--eval.batch_size=8", "--eval.test=false",
         "--schedule.warmup_steps=0", "--train.threads=1", "--optim.lr=1e-2"]


@pytest.fixture(scope="module")
def llama_run(prepared_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("init_skip") / "run"
    proc = run_cli("train", *TINY_DATA, *LLAMA, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=3", "--eval.interval=0", f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_loaded_run_is_its_file_bit_for_bit(llama_run):
    """load_artefact (what eval / generate / serve call) of the run: every tensor is the
    file's, and the logits are those of the model built with its init and then loaded
    (the behaviour before the skip), exactly."""
    stored = load_file(str(llama_run / "model.safetensors"))
    cfg, model, tok = load_artefact(llama_run, which="final")
    state = model.state_dict()
    assert set(state) == set(stored)  # untied: nothing stored once
    for k, v in stored.items():
        assert torch.equal(state[k], v), k
    ref = build_model(cfg.model, {"vocab_size": tok.vocab_size}, seed=cfg.train.seed)
    load_weights(ref, llama_run / "model.safetensors", spec_of(cfg.model).tied)
    x = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))


def test_init_from_run_starts_from_its_weights(llama_run, prepared_dir, tmp_path):
    """train --init.from=RUN (init skipped): the step-0 validation loss is the source
    model's on the same batches, computed here in one process."""
    from scaletrain.compress.report import val_loss
    from scaletrain.data.build import build_data

    run = tmp_path / "ft"
    args = [*TINY_DATA, *LLAMA, f"--data.prepared_dir={prepared_dir}"]
    proc = run_cli("train", *args, f"--init.from={llama_run}", f"--run.dir={run}",
                   "--train.steps=1", "--eval.interval=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step0 = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"][0]
    _, model, _ = load_artefact(llama_run, which="final")
    cfg = make_cfg(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run (train.threads=1): the same reduction order
    try:
        expect = val_loss(model, build_data(cfg, progress=False).val, 8, 2)
    finally:
        torch.set_num_threads(threads)
    assert step0["step"] == 0 and step0["loss"] == expect, (step0, expect)


def _drop(src, dst, name: str) -> None:
    """Copy weights directory `src` to `dst` with tensor `name` removed from its file."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    state = load_file(str(f))
    del state[name]
    save_file(state, str(f), metadata={"format": "pt"})


def test_source_missing_a_tensor_exits_2(llama_run, prepared_dir, tmp_path):
    """One bias gone from the run's weights: `train --init.from`, `eval` and `generate`
    each refuse it with one line naming the tensor, exit 2, no run directory."""
    name = "blocks.1.self_attn.k_proj.bias"
    src = tmp_path / "src"
    _drop(llama_run, src, name)
    (src / "best.safetensors").unlink(missing_ok=True)  # the file every command reads
    run = tmp_path / "ft"
    proc = run_cli("train", *TINY_DATA, *LLAMA, f"--data.prepared_dir={prepared_dir}",
                   f"--init.from={src}", f"--run.dir={run}", "--train.steps=1",
                   "--eval.interval=0")
    one_error_line(proc, "missing", name)
    assert not run.exists()
    proc = run_cli("eval", str(src), f"--data.prepared_dir={prepared_dir}")
    one_error_line(proc, "missing", name)
    proc = run_cli("generate", str(src), "--generate.max_new_tokens=4")
    one_error_line(proc, "missing", name)


def test_hf_directory_missing_a_tensor_exits_2(tmp_path):
    """The same for a Hugging Face directory given to `generate` (no init first)."""
    pytest.importorskip("transformers")
    from tests.hf_dirs import VOCAB, hf_model_dir

    d = tmp_path / "hf"
    hf_model_dir(d, "Qwen2", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=64),
                 "5GB")
    _drop(d, tmp_path / "cut", "model.layers.0.self_attn.v_proj.bias")
    proc = run_cli("generate", str(tmp_path / "cut"), "--generate.max_new_tokens=4")
    one_error_line(proc, "missing", "blocks.0.self_attn.v_proj.bias")
