"""finetune/source_shapes.py: init.from's tensor shapes (safetensors headers) against the
model its config describes, for a run and for a LoRA run (adapters + its base)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scaletrain.errors import CheckpointError
from scaletrain.finetune.init_from import resolve_init
from scaletrain.finetune.source_shapes import check_source_shapes
from scaletrain.models.gpt import GPT, GPTConfig
from tests.conftest import make_cfg

MODEL = dict(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=300)


def write_run(d: Path, state: dict, extra_toml: str = "", d_model: int = 32) -> Path:
    d.mkdir(parents=True)
    fields = {**MODEL, "d_model": d_model}
    (d / "config.toml").write_text("[model]\nname = \"gpt\"\n" + "".join(
        f"{k} = {v}\n" for k, v in fields.items()) + extra_toml)
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    return d


def plain_state(d_model: int = 32) -> dict:
    m = GPT(GPTConfig(**{**MODEL, "d_model": d_model}))
    m.init_weights(0)
    return {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied


def check(source: Path) -> None:
    cfg = resolve_init(make_cfg([f"--init.from={source}", "--run.dir=/nonexistent/r"]))
    check_source_shapes(cfg)


def test_a_run_whose_weights_fit_passes_and_one_that_does_not_names_the_tensor(tmp_path):
    check(write_run(tmp_path / "ok", plain_state()))
    with pytest.raises(CheckpointError, match=r"wte.weight has shape \(300, 32\) in "
                                              r"model.safetensors, .*config.toml.*\(300, 64\)"):
        check(write_run(tmp_path / "wide", plain_state(), d_model=64))
    state = plain_state()
    del state["ln_f.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['ln_f.bias'\]"):
        check(write_run(tmp_path / "short", state))


def test_a_lora_run_checks_its_base_and_its_adapters(tmp_path):
    base = write_run(tmp_path / "base", plain_state())
    lora = "[init]\nfrom = \"{}\"\n[finetune]\nlora_rank = 4\nlora_alpha = 8.0\n"
    # c_attn: (96, 32); A (r, in), B (out, r)
    good = {"blocks.0.attn.c_attn.lora_A": torch.zeros(4, 32),
            "blocks.0.attn.c_attn.lora_B": torch.zeros(96, 4)}
    check(write_run(tmp_path / "lora", good, lora.format(base)))
    bad = {**good, "blocks.0.attn.c_attn.lora_A": torch.zeros(4, 48)}
    with pytest.raises(CheckpointError, match=r"adapters of blocks.0.attn.c_attn .*\(96, 32\)"):
        check(write_run(tmp_path / "bad", bad, lora.format(base)))
    # Its base's weights are not the shape of the LoRA run's config: named as the base.
    wide = write_run(tmp_path / "wide_base", plain_state(d_model=64), d_model=64)
    with pytest.raises(CheckpointError, match=r"\(its base '.*wide_base'\): wte.weight"):
        check(write_run(tmp_path / "on_wide", good, lora.format(wide)))
