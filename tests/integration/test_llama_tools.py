"""The llama family after training, end to end: `compress` (structured pruning in whole
kv groups, int4) and `generate` on its artefacts, and distillation between llama
and GPT runs that share a tokenizer."""

from __future__ import annotations

import pytest
import torch

from scaletrain.compress.artefact import load_artefact
from scaletrain.compress.distill import build_distill_loss, distill_sum_loss
from tests.conftest import TINY_DATA, TINY_GPT, make_cfg, run_cli

pytestmark = pytest.mark.timeout(300)

TINY_LLAMA = [a for a in TINY_GPT if not a.startswith(("--model.name", "--model.n_head"))] + [
    "--model.name=llama", "--model.n_head=4", "--model.n_kv_head=2", "--model.d_ff=64"]


def _train(prepared_dir, run_dir, model_args, steps):
    args = [*TINY_DATA, *model_args, f"--data.prepared_dir={prepared_dir}",
            f"--run.dir={run_dir}", f"--train.steps={steps}", "--eval.test=false"]
    proc = run_cli("train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args


@pytest.fixture(scope="module")
def runs(prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_tools")
    llama_args = _train(prepared_dir, root / "llama", TINY_LLAMA, 10)
    gpt_args = _train(prepared_dir, root / "gpt", TINY_GPT, 3)
    return {"llama": (root / "llama", llama_args), "gpt": (root / "gpt", gpt_args)}


def test_compress_and_generate_a_llama_run(runs, tmp_path):
    run, _ = runs["llama"]
    out = tmp_path / "c"
    proc = run_cli("compress", str(run), f"--compress.out={out}",
                   "--prune.method=structured", "--prune.amount=0.5",
                   "--quant.methods=weight-int4", "--compress.eval_batches=1",
                   "--compress.gen_tokens=4", "--compress.gen_repeats=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, pruned, _ = load_artefact(out / "pruned-structured-0.5")
    attn = pruned.blocks["0"].self_attn  # 1 of 2 kv groups: 2 query heads, 1 kv head
    assert attn.q_proj.weight.shape[0] == 2 * 8 and attn.k_proj.weight.shape[0] == 8
    for name in ("pruned-structured-0.5", "quant-weight-int4"):
        gen = run_cli("generate", str(out / name), "--generate.max_new_tokens=6",
                      "--generate.num_samples=1", "--generate.temperature=0")
        assert gen.returncode == 0 and "--- sample 1 ---" in gen.stdout, gen.stderr[-2000:]


@pytest.mark.parametrize("teacher, student", [("llama", "llama"), ("llama", "gpt"),
                                              ("gpt", "llama")])
def test_distillation_between_families(runs, teacher, student):
    t_dir, _ = runs[teacher]
    s_dir, s_args = runs[student]
    cfg = make_cfg([*s_args, f"--distill.teacher={t_dir}", "--distill.alpha=0.5",
                    "--distill.temperature=2.0"])
    loss_fn = build_distill_loss(cfg, "cpu")
    _, student_model, _ = load_artefact(s_dir)
    _, teacher_model, _ = load_artefact(t_dir)
    x = torch.randint(0, 384, (2, 32))
    y = torch.randint(0, 384, (2, 32))
    logits = student_model(x)
    with torch.no_grad():
        expect = distill_sum_loss(logits, teacher_model.eval()(x), y, 0.5, 2.0)
    torch.testing.assert_close(loss_fn(logits, x, y), expect)


def test_init_from_a_llama_run_on_a_pipeline(runs, prepared_dir, tmp_path):
    """init.from a llama run directory with parallel.pp=2 (`--nproc 2`): each stage takes
    its own tensors of the run's weights, so the step-0 validation loss is the source
    model's, computed in one process."""
    import json

    from scaletrain.compress.report import val_loss
    from scaletrain.data.build import build_data

    src, args = runs["llama"]
    run = tmp_path / "pp"
    common = [*TINY_DATA, f"--data.prepared_dir={prepared_dir}", "--eval.batches=2",
              "--eval.batch_size=8", "--eval.test=false"]
    proc = run_cli("train", *common, f"--init.from={src}", f"--run.dir={run}", "--nproc=2",
                   "--parallel.pp=2", "--parallel.dp_shard=1", "--train.batch_size=8",
                   "--train.micro_batch_size=2", "--train.steps=1", "--eval.interval=1",
                   "--train.progress=off", "--model.seq_len=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step0 = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"][0]
    cfg, model, _ = load_artefact(src)
    expect = val_loss(model, build_data(make_cfg([*args, "--eval.batches=2",
                                                  "--eval.batch_size=8"]),
                                        progress=False).val, 8, 2)
    assert step0["step"] == 0 and abs(step0["loss"] - expect) < 1e-5, (step0, expect)
