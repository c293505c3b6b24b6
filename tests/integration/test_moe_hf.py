"""Hugging Face in for MoE llamas (models/moe_hf.py): transformers' Qwen3-MoE and Mixtral
`save_pretrained` directories (small random configs) load with logits equal within 1e-5
and the same 32 greedy tokens; the per-expert tensors are stacked into our 3-D experts,
across shard files; `export --format hf` writes them back as the same classes, which
transformers loads with equal logits, and an MoE neither class computes is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.conftest import TINY_DATA, make_cfg, run_cli
from tests.hf_dirs import VOCAB, hf_model_dir
from scaletrain.checkpoint.hf_export import export_hf
from scaletrain.compress.artefact import load_artefact
from scaletrain.errors import ConfigError
from scaletrain.finetune.hf_import import hf_state_dict
from scaletrain.generate import sample

transformers = pytest.importorskip("transformers")

# (architecture, config, save shard size): Qwen3-MoE with a dense first layer
# (mlp_only_layers) and renormalised top-k, its default (not renormalised), Mixtral in
# several shard files (an expert's tensors land in different files).
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
            num_experts_per_tok=2)
CASES = {
    "qwen3_moe_dense_first": ("Qwen3Moe", dict(num_experts=6, moe_intermediate_size=16,
                                               intermediate_size=48, head_dim=16,
                                               norm_topk_prob=True, mlp_only_layers=[0]),
                              "5GB"),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=4, moe_intermediate_size=16,
                                   intermediate_size=48), "5GB"),
    "mixtral": ("Mixtral", dict(num_local_experts=4, intermediate_size=24,
                                sliding_window=None), "30KB"),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_hf")
    out = {}
    for name, (arch, extra, shard) in CASES.items():
        d = root / name
        out[name] = (d, hf_model_dir(d, arch, {**BASE, **extra}, shard, init=_spread_routers))
    return out


def _spread_routers(model) -> None:
    """Routers with spread logits: real top-k choices."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0.0, 0.5)


@pytest.mark.parametrize("name", list(CASES))
def test_moe_logits_and_greedy_tokens_equal_transformers(hf_dirs, name):
    d, hf = hf_dirs[name]
    cfg, model, _ = load_artefact(d)
    m = cfg.model
    assert m.moe_experts == (CASES[name][1].get("num_experts")
                             or CASES[name][1].get("num_local_experts"))
    kinds = [type(b.mlp).__name__ for b in model.blocks.values()]
    assert kinds == (["SwiGLU", "MoE"] if name == "qwen3_moe_dense_first" else ["MoE"] * 2)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[0, :8].tolist()
    ours = sample(model, prompt, max_new_tokens=32, seq_len=64, temperature=0.0)
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                         min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, 8:].tolist()


def test_experts_are_stacked_from_their_per_expert_tensors(hf_dirs):
    d, hf = hf_dirs["mixtral"]
    assert (d / "model.safetensors.index.json").is_file()  # sharded
    ours = hf_state_dict(d)
    got = ours["blocks.1.mlp.experts.gate_proj"]
    assert got.shape == (4, 32, 24)  # (E, in, out)
    # transformers >= 5 fuses gate and up in memory, (E, 2F, D), gate first
    fused = hf.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(got, fused[:, :24].transpose(1, 2), atol=0, rtol=0)


def test_fsdp_ranks_load_their_experts_then_export_hf(hf_dirs, tmp_path):
    """init.from the sharded Mixtral on two FSDP2 ranks (each reads the experts of its
    dim-0 shard): the step-0 validation loss is the one-process model's; after a step,
    `export --format hf` of the run is a Mixtral transformers loads with the trained
    model's logits."""
    from scaletrain.compress.report import val_loss
    from scaletrain.data.build import build_data

    d, _ = hf_dirs["mixtral"]
    run = tmp_path / "run"
    args = [*TINY_DATA, f"--data.prepared_dir={tmp_path / 'prep'}", f"--run.dir={run}",
            f"--init.from={d}", "--model.seq_len=32", "--train.batch_size=4",
            "--eval.batches=2", "--eval.batch_size=4", "--eval.test=false"]
    proc = run_cli("train", *args, "--nproc=2", "--train.steps=1", "--eval.interval=1",
                   "--train.progress=off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step0 = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"][0]
    cfg = make_cfg([a for a in args if not a.startswith(("--init.from", "--run.dir"))]
                   + [f"--data.tokenizer={d / 'tokenizer.json'}"])
    _, model, _ = load_artefact(d, [("model.seq_len", "32")])
    expect = val_loss(model, build_data(cfg, progress=False).val, 4, 2)
    assert step0["step"] == 0 and abs(step0["loss"] - expect) < 1e-5
    out = tmp_path / "out"
    proc = run_cli("export", str(run), "--format", "hf", "--out", str(out),
                   "--max-shard-size", "30KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "MixtralForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _, trained, _ = load_artefact(run)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, trained(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_export_hf_round_trip_equals_transformers(hf_dirs, name, tmp_path):
    """HF dir -> our model -> export_hf -> transformers: the same class, the MoE config
    fields it read, and logits equal to the original HF model's."""
    d, hf = hf_dirs[name]
    cfg, model, tok = load_artefact(d)
    export_hf(cfg, model, tok, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((d / "config.json").read_text())
    keys = ["architectures", "num_experts_per_tok", "intermediate_size", "num_hidden_layers"]
    keys += (["num_local_experts"] if name == "mixtral" else
             ["num_experts", "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers",
              "decoder_sparse_step"])
    assert {k: written[k] for k in keys} == {k: source.get(k, written[k]) for k in keys}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source, field, value, why", [
    ("qwen3_moe", "moe_shared_experts", 1, "shared experts"),
    ("qwen3_moe", "moe_router", "sigmoid_bias", "moe_router='sigmoid_bias'"),
    ("qwen3_moe", "moe_capacity_factor", 1.25, "capacity factor"),
    ("mixtral", "moe_first_dense", 1, "dense blocks"),
    ("mixtral", "moe_norm_topk_prob", False, "unnormalised top-k"),
    ("qwen3_moe", "moe_experts", 0, "disagree"),
])
def test_export_hf_refuses_an_moe_the_classes_cannot_compute(hf_dirs, source, field, value,
                                                              why, tmp_path):
    d, _ = hf_dirs[source]
    cfg, model, tok = load_artefact(d)
    m = dataclasses.replace(cfg.model, **{field: value})
    with pytest.raises(ConfigError, match=why):
        export_hf(dataclasses.replace(cfg, model=m), model, tok, tmp_path / "out")


def _loud_experts(model) -> None:
    """Spread routers, and experts whose output moves the loss: at transformers' init
    (std 0.02) a rank holding another rank's experts moved the step-0 validation loss by
    less than 1e-5."""
    _spread_routers(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.normal_(0.0, 0.3)


def test_ep_ranks_load_their_experts_through_the_cli(hf_dirs, tmp_path):
    """`train --init.from=<Qwen3-MoE dir> --nproc 2 --parallel.dp_shard=2
    --parallel.ep=2` (each rank reads the 3 of 6 experts it owns:
    tests/distributed/test_moe_hf_load_ep.py counts the reads; the experts drawn large
    enough that a wrong one moves the loss, `_loud_experts`): the step-0 validation
    loss is the one-process model's, and the first step's training loss is a one-process
    run's (fp32: both reduce the same sums in another order, 1e-6 relative)."""
    from scaletrain.compress.report import val_loss
    from scaletrain.data.build import build_data

    d = tmp_path / "qwen3_moe"
    arch, extra, shard = CASES["qwen3_moe_dense_first"]
    hf_model_dir(d, arch, {**BASE, **extra}, shard, init=_loud_experts)
    args = [*TINY_DATA, f"--data.prepared_dir={tmp_path / 'prep'}", f"--init.from={d}",
            "--model.seq_len=32", "--train.batch_size=4", "--eval.batches=2",
            "--eval.batch_size=4", "--eval.test=false", "--train.steps=1",
            "--eval.interval=1", "--train.progress=off"]
    recs = {}
    for name, layout in (("ep2", ["--nproc=2", "--parallel.dp_shard=2", "--parallel.ep=2"]),
                         ("one", [])):
        run = tmp_path / name
        proc = run_cli("train", *args, *layout, f"--run.dir={run}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        recs[name] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    par = json.loads((tmp_path / "ep2" / "summary.json").read_text())["parallel"]
    assert (par["dp_shard"], par["ep"]) == (2, 2)
    step0 = [r for r in recs["ep2"] if r["kind"] == "eval"][0]
    cfg = make_cfg([a for a in args if not a.startswith("--init.from")]
                   + [f"--data.tokenizer={d / 'tokenizer.json'}"])
    _, model, _ = load_artefact(d, [("model.seq_len", "32")])
    expect = val_loss(model, build_data(cfg, progress=False).val, 4, 2)
    assert step0["step"] == 0 and abs(step0["loss"] - expect) < 1e-5
    first = {k: [r["loss"] for r in v if r["kind"] == "train" and r["step"] == 1]
             for k, v in recs.items()}
    assert len(first["ep2"]) == 1 and first["ep2"] == pytest.approx(first["one"], rel=1e-6)
