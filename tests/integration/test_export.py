"""`scaletrain export`: the HF directory loads in transformers as GPT2LMHeadModel and gives
scaletrain's logits; safetensors export round-trips; bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def trained_run(prepared_dir, tmp_path_factory):
    from tests.conftest import TINY_DATA, TINY_GPT

    run = tmp_path_factory.mktemp("export") / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=6", "--checkpoint.interval=3", "--eval.test=false",
                   "--train.threads=1", f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_hf_export_loads_in_transformers_with_matching_logits(trained_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from scaletrain.checkpoint.run_model import load_model_from_run

    out = tmp_path / "hf"
    proc = run_cli("export", f"--run.dir={trained_run}", "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    _, ours, our_tok = load_model_from_run(trained_run, which="final")
    text = "def add(a, b):\n    return a + b\n"
    ids = our_tok.encode(text)[:32]
    assert tok(text)["input_ids"][:len(ids)] == ids  # same tokenizer
    x = torch.tensor([ids])
    with torch.no_grad():
        want, got = ours(x).float(), hf(x).logits.float()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_hf_tokenizer_reads_a_literal_endoftext_as_text_like_scaletrain(trained_run, tmp_path):
    # Text is text: "<|endoftext|>" typed in a prompt is ordinary characters in both
    # tokenizers, never the end-of-text id (which only prepare / eos_token_id use).
    transformers = pytest.importorskip("transformers")
    from scaletrain.data.tokenizer import EOT, Tokenizer

    out = tmp_path / "hf"
    proc = run_cli("export", str(trained_run), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = Tokenizer.load(trained_run / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    text = f"x = 1{EOT}def f():{EOT}"
    ids = ours.encode(text)
    assert ours.eot_id not in ids and len(ids) > 4
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == ours.decode(ids) == text
    assert hf.eos_token_id == ours.eot_id  # the id itself is still the special token


def test_safetensors_export_round_trips_and_checkpoint_fallback(trained_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "st"
    proc = run_cli("export", str(trained_run), "--format", "safetensors", "--out", str(out),
                   "--weights", "checkpoint")  # consolidated from the newest DCP checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.toml",
                                               "tokenizer.json"}
    got, want = load_file(str(out / "model.safetensors")), \
        load_file(str(trained_run / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # step-6 checkpoint == final


def test_export_refuses_bias_free_gpt_and_foreign_dirs(prepared_dir, tmp_path):
    from tests.conftest import TINY_DATA, TINY_GPT

    run = tmp_path / "nobias"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=1", "--model.bias=false", "--eval.test=false",
                   f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for args, fragment in [([str(run), "--format", "hf"], "model.bias=false"),
                           ([str(tmp_path), "--format", "hf"], "not a scaletrain run")]:
        proc = run_cli("export", *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], proc.stderr


def _eval(capsys, *args: str) -> dict:
    from scaletrain.cli import main

    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_an_hf_export_uses_the_directory_tokenizer(trained_run, prepared_dir,
                                                           tmp_path, capsys):
    """Issue 13 item 6: an exported directory brings its tokenizer, on any data."""
    from scaletrain.cli import main
    from scaletrain.data.tokenizer import train_bpe
    from tests.conftest import TINY_DATA

    out = tmp_path / "hf"
    proc = run_cli("export", str(trained_run), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # On the run's own corpus: the export's loss is the run's (the cached data is reused).
    tiny = [*TINY_DATA, f"--data.prepared_dir={prepared_dir}"]
    run = _eval(capsys, str(trained_run), "--weights", "final")
    assert _eval(capsys, str(out), *tiny)["loss"] == pytest.approx(run["loss"], rel=1e-5)
    # On a corpus the model never saw: encoded with the export's tokenizer, not a BPE
    # trained on the new text (what the HF directory's default config would ask for).
    prose = tmp_path / "prose"
    prose.mkdir()
    words = "the cat sat on a mat while the dog ran to the park by the old river".split()
    for i in range(12):
        (prose / f"doc{i}.txt").write_text(" ".join(words[(i + 5 * j) % len(words)]
                                                    for j in range(300)))
    new = [f"--data.source={prose}", "--data.prep_workers=1",
           f"--data.prepared_dir={tmp_path / 'prep'}"]
    want = _eval(capsys, str(trained_run), "--weights", "final", *new,
                 f"--data.tokenizer={trained_run / 'tokenizer.json'}")
    assert _eval(capsys, str(out), *new)["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # A tokenizer that is not the directory's own is refused, not silently used.
    other = tmp_path / "other.json"
    train_bpe(["def f(x):\n    return x\n"] * 4, 300).save(other)
    assert main(["eval", str(out), *new, f"--data.tokenizer={other}"]) == 2
    assert "data.tokenizer" in capsys.readouterr().err
