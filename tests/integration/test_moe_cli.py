"""An MoE llama through the CLI as users run it: a tiny train run whose metrics.jsonl
carries the router's health, and the bad MoE input refused with exit 2 and one line
before anything is launched or prepared."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY_DATA, TINY_GPT, one_error_line, run_cli

# configs/moe-tiny.toml's shape, made tiny.
TINY_MOE = ["--model.name=llama", "--model.n_kv_head=1", "--model.moe_experts=8",
            "--model.moe_top_k=2", "--model.moe_d_ff=32", "--model.moe_shared_experts=1",
            "--model.moe_first_dense=1", "--model.moe_aux_loss=0.01",
            "--model.moe_z_loss=0.001"]


def test_tiny_moe_trains_and_logs_router_health(prepared_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, *TINY_MOE, "--train.steps=3",
                   "--model.moe_router=sigmoid_bias", f"--data.prepared_dir={prepared_dir}",
                   f"--run.dir={run}", "--eval.batches=1", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in ln]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        # one MoE block (block 0 dense): its imbalance; aux near top_k when balanced
        assert list(r["moe_imbalance"]) == ["1"] and r["moe_imbalance"]["1"] >= 1.0
        assert sum(r["moe_load"]["1"]) == 8 * 32 * 2  # batch x seq_len x top_k
        assert 1.0 < r["moe_aux_loss"] < 8.0 and r["moe_z_loss"] > 0
        assert r["moe_dropped"] == 0.0
        assert 3.0 < r["loss"] < 7.0  # the cross-entropy alone (ln 384 ≈ 5.95)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mfu"] is not None
    # TensorBoard: the per-block imbalance as scalars, the load per expert as a histogram
    # (bucket e = expert e's assignments) at every logged step
    # (size_guidance 0: keep every histogram event; the default keeps one sample)
    tb = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/moe_imbalance/1")] == [1, 2, 3]
    hists = tb.Histograms("train/moe_load/1")
    assert [list(h.histogram_value.bucket) for h in hists] == [r["moe_load"]["1"] for r in train]


BAD = [
    (["--model.moe_top_k=9"], "model.moe_top_k=9 exceeds model.moe_experts=8"),
    (["--model.moe_capacity_factor=-1"], "model.moe_capacity_factor=-1.0 must be > 0"),
    (["--model.moe_first_dense=2"], "no block is an MoE block"),
    (["--model.moe_experts=0"], "model.moe_top_k is set but model.moe_experts=0"),
    (["--model.name=gpt", "--model.moe_top_k=2"], "built for model.name='llama'"),
    (["--parallel.activation_checkpoint=budget", "--parallel.activation_budget_gib=1"],
     "parallel.activation_checkpoint='budget' is not supported with mixture-of-experts"),
    (["--train.compile=true", "--train.compile_scope=model"],
     "train.compile_scope='model' is not supported"),
]


@pytest.mark.parametrize("extra,line", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_moe_input_is_one_line(tmp_path, extra, line):
    args = [a for a in TINY_MOE if not (a.startswith("--model.moe_top_k") and
                                        any(e.startswith("--model.moe_top_k") for e in extra))]
    if "--model.moe_experts=0" in extra:  # a dense model with an MoE field left set
        args = ["--model.name=llama", "--model.moe_top_k=4"]
        extra = []
        line = "model.moe_top_k is set but model.moe_experts=0"
    proc = run_cli("train", *args, *extra, "--model.n_layer=2", f"--run.dir={tmp_path}/r",
                   timeout=60)
    one_error_line(proc, line)
    assert not (tmp_path / "r").exists()


# TP trains MoE layers (test_moe_tp_cli_matches_one_process); its boundary: not with
# train.compile, nor with expert parallelism.
UNSUPPORTED = [(["--parallel.tp=2", "--parallel.dp_shard=1", "--train.compile=true"], "2",
                "train.compile with parallel.tp > 1 is not supported"),
               (["--parallel.tp=2", "--parallel.dp_shard=2", "--parallel.ep=2"], "4",
                "parallel.ep=2 with parallel.tp=2 is not supported yet")]


@pytest.mark.parametrize("layout,nproc,line", UNSUPPORTED, ids=["tp_compile", "tp_ep"])
def test_unsupported_moe_layouts_refused_before_launch(tmp_path, layout, nproc, line):
    proc = run_cli("train", *TINY_MOE, "--model.n_layer=2", *layout, "--nproc", nproc,
                   f"--run.dir={tmp_path}/r", timeout=60)
    one_error_line(proc, line)
    assert not (tmp_path / "r").exists()


def test_moe_tp_cli_matches_one_process(prepared_dir, tmp_path):
    """`--nproc 2 --parallel.tp=2` (models/plans.py `moe_tp_plan`: the router and the
    routed experts replicated over tp, the shared expert sharded) against one process in
    fp64: the losses, every metrics.jsonl MoE field (counted once, not per tp rank), the
    validation losses and the final weights, the balancing bias included."""
    base = ["train", *TINY_DATA, *TINY_GPT, *TINY_MOE, "--model.n_kv_head=2",
            "--model.moe_router=sigmoid_bias", "--model.moe_bias_update_rate=0.01",
            "--precision.dtype=fp64", "--train.steps=4", "--eval.interval=2",
            "--eval.test=false", "--train.threads=1", f"--data.prepared_dir={prepared_dir}"]
    one, tp = tmp_path / "one", tmp_path / "tp"
    for args in ([f"--run.dir={one}"],
                 [f"--run.dir={tp}", "--nproc", "2", "--parallel.tp=2",
                  "--parallel.dp_shard=1"]):
        proc = run_cli(*base, *args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_moe_run(one, tp, eval_rel=1e-10)


PIPELINES = {"pp2": ["--nproc", "2", "--parallel.pp=2", "--parallel.dp_shard=1",
                     "--train.micro_batch_size=4"],
             "pp2_ep2": ["--nproc", "4", "--parallel.pp=2", "--parallel.dp_shard=2",
                         "--parallel.ep=2", "--train.micro_batch_size=2"]}


@pytest.mark.parametrize("layout", list(PIPELINES))
def test_moe_pipeline_cli_matches_one_process(prepared_dir, tmp_path, layout):
    """`--nproc 2 --parallel.pp=2` (1f1b, 2 micro-batches; block 0 dense, so the first
    stage holds no MoE layer), and EP × PP on 4 (each stage's 2 ranks split its experts,
    2 micro-batches of 2 per rank),
    against one process in fp64: the losses, every metrics.jsonl MoE field, the
    validation losses (an eval between steps: the stages run it in eval mode, adding
    nothing to the next step's load) and the final weights of every stage, the balancing
    bias included (parallel/pipeline_moe.py)."""
    base = ["train", *TINY_DATA, *TINY_GPT, *TINY_MOE, "--model.moe_router=sigmoid_bias",
            "--model.moe_bias_update_rate=0.01", "--precision.dtype=fp64",
            "--train.steps=4", "--eval.interval=2",
            "--eval.test=false", "--train.threads=1", f"--data.prepared_dir={prepared_dir}"]
    one, pp = tmp_path / "one", tmp_path / "pp"
    for args in ([f"--run.dir={one}", "--train.micro_batch_size=4"],
                 [f"--run.dir={pp}", *PIPELINES[layout]]):
        proc = run_cli(*base, *args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # eval 1e-6: the pipeline's evaluation divides in fp32 whatever the run's dtype
    # (Pipeline.eval_loss_sum); dense pipeline runs do the same.
    train = assert_same_moe_run(one, pp, eval_rel=1e-6)
    assert list(train[0]["moe_load"]) == ["1"]  # the second stage's block, on every record


def test_moe_resume_is_exact_with_the_balancing_bias(prepared_dir, tmp_path):
    """2 steps + resume to 4 == 4 straight: the sigmoid_bias buffer is model state in
    the checkpoint (the losses, the router records and the final weights, bias included,
    equal bitwise)."""
    from safetensors.torch import load_file

    base = ["train", *TINY_DATA, *TINY_GPT, *TINY_MOE, "--model.moe_router=sigmoid_bias",
            "--model.moe_bias_update_rate=0.01", f"--data.prepared_dir={prepared_dir}",
            "--checkpoint.interval=2", "--eval.test=false", "--train.threads=1",
            "--schedule.name=constant"]  # the LR must not depend on train.steps
    straight, resumed = tmp_path / "a", tmp_path / "b"
    for args in ([f"--run.dir={straight}", "--train.steps=4"],
                 [f"--run.dir={resumed}", "--train.steps=2"],
                 [f"--run.dir={resumed}", "--train.steps=4"]):
        proc = run_cli(*base, *args, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def train(run):
        return [(r["step"], r["loss"], r["moe_load"]) for r in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert train(straight) == train(resumed)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert sorted(a) == sorted(b) and any(k.endswith("expert_bias") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["blocks.1.mlp.expert_bias"].abs().sum() > 0


@pytest.mark.timeout(600)
def test_moe_pipeline_resume_is_exact(prepared_dir, tmp_path):
    """MoE x PP (`--nproc 2 --parallel.pp=2`, 1f1b, 2 micro-batches; the MoE block and
    its sigmoid_bias buffer on the second stage): stopped at step 2 and resumed to 4, the
    losses, the router records and the final weights, bias included, equal the
    uninterrupted run's bitwise (the bias is each stage's model state in the checkpoint,
    parallel/pipeline_moe.py sums the stages' loads before updating it)."""
    from safetensors.torch import load_file

    base = ["train", *TINY_DATA, *TINY_GPT, *TINY_MOE, "--model.moe_router=sigmoid_bias",
            "--model.moe_bias_update_rate=0.01", f"--data.prepared_dir={prepared_dir}",
            "--checkpoint.interval=2", "--eval.test=false", "--train.threads=1",
            "--schedule.name=constant", *PIPELINES["pp2"]]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    for args in ([f"--run.dir={straight}", "--train.steps=4"],
                 [f"--run.dir={resumed}", "--train.steps=2"],
                 [f"--run.dir={resumed}", "--train.steps=4"]):
        proc = run_cli(*base, *args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def train(run):
        return [(r["step"], r["loss"], r["moe_load"], r["moe_aux_loss"]) for r in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert [r[0] for r in train(resumed)] == [1, 2, 3, 4]
    assert train(straight) == train(resumed)
    assert (resumed / "checkpoints" / "step-00000002").is_dir()
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["blocks.1.mlp.expert_bias"].abs().sum() > 0


@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_plan_of_the_moe_configs_runs(router):
    """`scaletrain plan` on moe-tiny with either router (sigmoid_bias's expert_bias
    buffer used to crash the plan's fake-tensor measurement on meta), every block MoE."""
    proc = run_cli("plan", "--config", "configs/moe-tiny.toml", f"--model.moe_router={router}",
                   "--model.moe_first_dense=0", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted peak" in proc.stdout


def _records(run, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def assert_same_moe_run(one, other, *, eval_rel: float) -> list[dict]:
    """An fp64 MoE run of 4 steps in another layout against the one-process run: losses
    to 1e-10, every metrics.jsonl MoE field (loads exact), the validation losses to
    `eval_rel`, the final weights (the balancing bias, which must have moved, included)
    to 1e-10. Returns the other run's train records."""
    from safetensors.torch import load_file

    a, b = _records(one, "train"), _records(other, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-10)
        for key in ("moe_load", "moe_imbalance", "moe_dropped"):
            assert y[key] == x[key], (x["step"], key)
        for key in ("moe_aux_loss", "moe_z_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-10), (x["step"], key)
    va, vb = _records(one, "eval"), _records(other, "eval")
    assert [r["step"] for r in vb] == [r["step"] for r in va] and vb
    assert all(y["loss"] == pytest.approx(x["loss"], rel=eval_rel) for x, y in zip(va, vb))
    wa, wb = load_file(one / "model.safetensors"), load_file(other / "model.safetensors")
    assert sorted(wa) == sorted(wb) and wa["blocks.1.mlp.expert_bias"].abs().sum() > 0
    diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert diff <= 1e-10, f"weights differ by {diff:.3g}"
    return b
