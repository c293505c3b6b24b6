"""The special tokens of a Hugging Face directory mean in scaletrain what they mean in
transformers (issue #15): prepared documents end with transformers' eos id (never its
bos), `generate` stops where transformers' own generation config stops, an export
declares the same bos / eos ids, and a directory whose declared tokens contradict the
ones scaletrain uses is refused. tests/hf_dirs.py builds the directory from BOS / EOS, so
swapping those two names turns every test here red."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import make_cfg, one_error_line, run_cli
from tests.hf_dirs import VOCAB, hf_model_dir
from scaletrain.checkpoint.hf_export import export_hf
from scaletrain.compress.artefact import load_artefact
from scaletrain.data.prepare import prepare

transformers = pytest.importorskip("transformers")  # pinned in requirements.txt

PROMPT = "def f(x):\n"  # greedy decoding of the directory below ends it after 16 tokens


def _eos_prone(model) -> None:
    """A shared component in every embedding and an eos head row along it: the eos
    logit grows with the context, so greedy decoding of PROMPT emits a few ordinary
    tokens, then eos (the values tuned by hand on this seed; the test checks it)."""
    with torch.no_grad():
        model.model.embed_tokens.weight += 0.01
        model.lm_head.weight[model.config.eos_token_id] = 0.02


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("special") / "llama"
    hf = hf_model_dir(d, "Llama", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False), "5GB", init=_eos_prone)
    return d, hf


def test_prepared_documents_end_with_transformers_eos(llama_dir, tmp_path):
    """data.tokenizer = the directory's tokenizer.json: every document of the token
    files ends with transformers' eos id, and its bos id appears nowhere."""
    d, _ = llama_dir
    fast = transformers.AutoTokenizer.from_pretrained(d)
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n"
                                             * (3 + i % 5))
    cfg = make_cfg([f"--data.source={src}", f"--data.tokenizer={d / 'tokenizer.json'}",
                    f"--data.prepared_dir={tmp_path / 'prep'}", "--data.prep_workers=1",
                    "--data.val_fraction=0.1", "--data.test_fraction=0.1"])
    out = prepare(cfg.data, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eot_id"] == fast.eos_token_id
    ids = np.fromfile(out / "train.bin", dtype=manifest["dtype"]).tolist()
    assert ids[-1] == fast.eos_token_id and fast.bos_token_id not in ids
    # cut at the eos: every piece is transformers' encoding of one whole file
    encoded = [fast((src / f"doc{i:02d}.txt").read_text(), add_special_tokens=False)
               ["input_ids"] for i in range(40)]
    cuts = [i for i, t in enumerate(ids) if t == fast.eos_token_id]
    pieces = [ids[a + 1:b] for a, b in zip([-1] + cuts, cuts)]
    assert len(pieces) >= 20 and all(p in encoded for p in pieces), pieces[:2]


def test_generate_stops_at_transformers_eos(llama_dir):
    """`scaletrain generate DIR`, greedy: the same tokens as transformers' generate with
    the directory's own generation config, which stops at its eos, before the limit."""
    d, hf = llama_dir
    fast = transformers.AutoTokenizer.from_pretrained(d)
    ids = fast(PROMPT, add_special_tokens=False)["input_ids"]
    theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                         pad_token_id=fast.bos_token_id)[0, len(ids):].tolist()
    assert theirs[-1] == fast.eos_token_id and 4 <= len(theirs) < 32, theirs
    proc = run_cli("generate", str(d), f"--generate.prompt={PROMPT}",
                   "--generate.num_samples=1", "--generate.temperature=0",
                   "--generate.max_new_tokens=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = fast.decode(theirs[:-1], skip_special_tokens=False)
    assert proc.stdout.split("--- sample 1 ---\n", 1)[1] == PROMPT + text + "\n"


def test_export_declares_transformers_own_ids(llama_dir, tmp_path):
    """The directory read in and exported (as `export --format hf` does): config.json,
    generation_config.json and the tokenizer files carry the bos / eos ids transformers
    reads from the source directory, and transformers reads them back the same."""
    d, _ = llama_dir
    src_tok = transformers.AutoTokenizer.from_pretrained(d)
    src_gen = transformers.GenerationConfig.from_pretrained(d)
    want = (src_tok.bos_token_id, src_tok.eos_token_id)
    assert want == (src_gen.bos_token_id, src_gen.eos_token_id) and None not in want
    cfg, model, tok = load_artefact(d)
    assert (tok.bos_id, tok.eot_id) == want
    out = tmp_path / "out"
    export_hf(cfg, model, tok, out)
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == want
    assert (gen["bos_token_id"], gen["eos_token_id"]) == want
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (back_tok.bos_token_id, back_tok.eos_token_id) == want
    back_gen = transformers.AutoModelForCausalLM.from_pretrained(out).generation_config
    assert (back_gen.bos_token_id, back_gen.eos_token_id) == want


@pytest.mark.parametrize("swap", ["eos", "bos"])
def test_contradicting_special_tokens_exit_2(llama_dir, tmp_path, swap):
    """A tokenizer_config.json whose eos is the beginning-of-text token, or whose bos is
    the end-of-text token scaletrain separates documents with: one line, exit 2, and
    no run directory — not documents silently cut at another id than transformers'."""
    d = tmp_path / "hf"
    shutil.copytree(llama_dir[0], d)
    f = d / "tokenizer_config.json"
    c = json.loads(f.read_text())
    if swap == "eos":
        c["eos_token"] = c["bos_token"]
    else:
        c["bos_token"] = c["eos_token"]
        c["eos_token"] = "<|eot_id|>"  # a turn end: fine as eos, not as a boundary
    f.write_text(json.dumps(c))
    run = tmp_path / "run"
    proc = run_cli("train", f"--init.from={d}", f"--run.dir={run}", "--data.max_files=4",
                   "--data.source=python-stdlib", f"--data.prepared_dir={tmp_path / 'p'}",
                   "--train.steps=1")
    one_error_line(proc, str(f), f"{swap}_token is")
    assert not run.exists() and not (tmp_path / "p").exists()
    proc = run_cli("generate", str(d), "--generate.max_new_tokens=4")  # not text-less
    one_error_line(proc, str(f), f"{swap}_token is")
