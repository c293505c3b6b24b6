"""A GPT-2 directory written by `transformers` loads with identical logits."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.finetune import hf_import
from scaletrain.compress.artefact import load_artefact
from scaletrain.errors import CheckpointError
from scaletrain.finetune import find_source

transformers = pytest.importorskip("transformers")  # pinned in requirements.txt


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=211, n_positions=24, n_embd=48, n_layer=2,
                                  n_head=3, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(d)
    ids = torch.randint(0, 211, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    return d, ids, ref


def test_hf_gpt2_loads_with_identical_logits(hf_dir):
    d, ids, ref = hf_dir
    cfg, model, tok = load_artefact(d)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model, cfg.model.seq_len,
            cfg.model.vocab_size) == (2, 3, 48, 24, 211)
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert tok is None  # no tokenizer saved: usable for logits, and with a data tokenizer


def test_hf_dir_is_an_init_source(hf_dir):
    src = find_source(hf_dir[0])
    assert src.kind == "hf" and src.model["d_model"] == 48


def test_unsupported_hf_config_is_a_checkpoint_error(hf_dir, tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    c = json.loads((hf_dir[0] / "config.json").read_text())
    c["activation_function"] = "relu"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="activation_function"):
        hf_import.hf_model_fields(d)
    (d / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_import.hf_state_dict(d)
