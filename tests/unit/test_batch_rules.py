"""Batch rules: LR scaling with the global batch, batch ramp-up, descent modes.

Real tiny runs check what a user sees in metrics.jsonl (tokens per step = samples ×
seq_len, since every position of a text window is a target) and where the sampler ends.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from scaletrain.config import build_config
from scaletrain.data.sampler import GlobalSampler
from scaletrain.errors import ConfigError
from scaletrain.optim.batch_rules import BatchPlan, build_batch_plan, scaled_lr
from tests.conftest import make_cfg, one_process_trainer

SEQ = 32  # tiny_args' model.seq_len


def fit(args):
    cfg = make_cfg(args)
    tr = one_process_trainer(cfg)
    tr.fit()
    with open(f"{cfg.run.dir}/metrics.jsonl") as f:
        recs = [r for r in map(json.loads, f) if r["kind"] == "train"]
    return tr, recs


def per_step_samples(recs) -> list[int]:
    tokens = [0] + [r["tokens"] for r in recs]
    return [(b - a) // SEQ for a, b in zip(tokens, tokens[1:])]


@pytest.mark.parametrize("rule,factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling(rule, factor, tiny_args):
    cfg = build_config(None, [("optim.lr", "0.001"), ("train.batch_size", "128"),
                              ("optim.base_batch_size", "32"), ("optim.lr_scaling", rule)])
    assert scaled_lr(cfg) == pytest.approx(0.001 * factor, rel=1e-15)
    _, recs = fit(tiny_args + ["--optim.lr=0.001", "--optim.base_batch_size=2",
                               f"--optim.lr_scaling={rule}", "--schedule.name=constant",
                               "--train.steps=2", "--eval.test=false"])
    assert recs[0]["lr"] == pytest.approx(0.001 * factor, rel=1e-15)  # batch 8 = 4 x 2


def test_ramp_sizes_depend_on_config_not_world():
    one = BatchPlan(full=64, micro=4, dp=1, head_micro=4, ramp_start=8, ramp_tokens=1000)
    two = BatchPlan(full=64, micro=2, dp=2, head_micro=2, ramp_start=8, ramp_tokens=1000)
    sizes = [one.batch_size(t) for t in range(0, 1200, 7)]
    assert sizes == [two.batch_size(t) for t in range(0, 1200, 7)]
    assert sizes[0] == 8 and sizes[-1] == 64 and sorted(sizes) == sizes
    assert all(s % 8 == 0 for s in sizes)  # whole micro-batches on every rank
    assert set(sizes) == set(range(8, 65, 8))


def test_batch_ramp_run(tiny_args):
    # Full batch 8, start 2, ramp over 20 samples' tokens: 2 + 6 * seen / (20 * SEQ).
    tr, recs = fit(tiny_args + ["--train.batch_ramp_start=2", f"--train.batch_ramp={20 * SEQ}",
                                "--train.micro_batch_size=2", "--train.steps=8",
                                "--eval.test=false"])
    sizes, seen, want = per_step_samples(recs), 0, []
    for _ in range(8):
        b = 8 if seen >= 20 else min(8, (2 + 6 * seen // 20) // 2 * 2)
        want.append(b)
        seen += b
    assert sizes == want and want[0] == 2 and want[-1] == 8 and len(set(want)) > 2
    # The loader consumed exactly these samples of the global order, no more.
    ref = GlobalSampler(len(tr.data.train), tr.cfg.train.seed, True)
    ref.next_global(sum(want))
    assert tr.loader.state_dict()["pos"] == ref.state_dict()["pos"]


def test_stochastic_descent(tiny_args):
    tr, recs = fit(tiny_args + ["--train.descent=stochastic", "--train.steps=4",
                                "--eval.test=false"])
    assert per_step_samples(recs) == [1, 1, 1, 1] and tr.micro == 1


@pytest.fixture(scope="module")
def digits_args(tmp_path_factory) -> list[str]:
    """A small MLP on scikit-learn's digits (1257 train samples): full-batch steps are
    cheap, unlike a pass over a text corpus."""
    prepared = tmp_path_factory.mktemp("digits")
    return ["--data.source=digits", f"--data.prepared_dir={prepared}", "--model.name=mlp",
            "--model.hidden=16", "--train.progress=off", "--eval.interval=0",
            "--eval.test=false", "--train.log_interval=1", "--checkpoint.interval=0"]


def test_full_batch_descent(digits_args, tmp_path):
    tr, recs = fit(digits_args + ["--train.descent=full-batch", "--train.steps=2",
                                  "--train.micro_batch_size=500", f"--run.dir={tmp_path}"])
    n = len(tr.data.train)
    tokens = [r["tokens"] for r in recs]  # image targets: one per sample
    assert tokens == [n, 2 * n]
    assert tr.loader.state_dict()["epoch"] == 2 and tr.loader.state_dict()["pos"] == 0
    assert tr.micro == 500 and n % 500  # accumulated, with a smaller last micro-batch
    # summary.json's accumulation: micro-batches of the whole split, not train.batch_size's
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parallel"]["accumulation_steps"] == -(-n // 500) == 4  # 1617 samples


def test_full_batch_is_the_exact_full_gradient(digits_args, tmp_path):
    """One full-batch step with micro-batches (the last one smaller) equals plain
    gradient descent on the mean loss of the whole train split (float64)."""
    import torch

    from scaletrain.models.losses import sum_cross_entropy

    args = digits_args + [
        "--train.descent=full-batch", "--train.micro_batch_size=300", "--train.steps=1",
        "--precision.dtype=fp64", "--optim.name=sgd", "--optim.momentum=0",
        "--optim.weight_decay=0", "--optim.lr=0.5", "--schedule.name=constant",
        "--train.grad_clip=0", "--model.dropout=0", f"--run.dir={tmp_path}"]
    tr = one_process_trainer(make_cfg(args))
    start = [p.detach().clone() for p in tr.model.parameters()]
    x, y = tr.data.train.batch(np.arange(len(tr.data.train)))
    loss = sum_cross_entropy(tr.model(x.double()), y) / y.numel()
    grads = torch.autograd.grad(loss, list(tr.model.parameters()))
    tr.fit()
    for p0, g, p in zip(start, grads, tr.model.parameters()):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pairs,match", [
    ([("train.batch_ramp", "100"), ("train.batch_ramp_start", "4")], "micro_batch_size"),
    ([("train.batch_ramp", "100"), ("train.micro_batch_size", "4"),
      ("train.batch_ramp_start", "6")], "batch_ramp_start"),
    ([("train.descent", "stochastic"), ("parallel.dp_replicate", "2")], "stochastic"),
    ([("optim.lr_scaling", "linear"), ("train.descent", "full-batch")], "base_batch_size"),
])
def test_bad_batch_rules_are_config_errors(pairs, match):
    with pytest.raises(ConfigError, match=match):
        build_config(None, pairs)


def test_full_batch_must_divide_over_ranks():
    cfg = build_config(None, [("train.descent", "full-batch")])
    with pytest.raises(ConfigError, match="data-parallel"):
        build_batch_plan(cfg, n_train=101, dp=2, pp=1)
