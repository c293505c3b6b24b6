"""Optimizers, gradient control and weight penalties, each against its definition.

- Gradient accumulation: k ∈ {1, 2, 4, 8} micro-batches give the one-batch step in
  float64 (max parameter difference <= 1e-10 after 10 steps), with unequal target
  counts per micro-batch, under every optimizer (and with L1/L2 penalties on).
- L1/L2 penalties: the step equals autograd on (mean loss + l1·Σ|w| + l2/2·Σw²).
- Clipping by global norm and by value; parameter groups; fused == foreach kernels.
"""

from __future__ import annotations

import pytest
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig
from scaletrain.models import build_model
from scaletrain.models.weight_norm import apply_weight_norm
from scaletrain.optim import build_optimizer, param_groups
from scaletrain.optim.optimizers import decayed_params
from scaletrain.optim.penalties import build_penalty
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import IGNORE_INDEX, sum_cross_entropy
from scaletrain.optim.step_end import StepEnd
from scaletrain.train.step import StepOptions, split_micro_batches, train_step
from tests.conftest import make_cfg, one_process_trainer

V, T, B = 61, 12, 8
FP64 = PrecisionPolicy("fp64", torch.device("cpu"))

OPTIMIZERS = {
    "sgd": dict(name="sgd", momentum=0.0, lr=0.1),
    "sgd-momentum": dict(name="sgd", momentum=0.9, lr=0.05),
    "sgd-nesterov": dict(name="sgd", momentum=0.9, nesterov=True, lr=0.05),
    "adam": dict(name="adam", lr=1e-2),
    "adamw": dict(name="adamw", lr=1e-2),
    "adagrad": dict(name="adagrad", lr=5e-2),
    "rmsprop": dict(name="rmsprop", lr=1e-3, momentum=0.5),
}


def make_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    # Sample i keeps T - i - (step % 3) targets: every micro-batch split has unequal counts.
    for i in range(B):
        y[i, T - i - step % 3:] = IGNORE_INDEX
    return x, y


def tiny(dtype=torch.float64):
    return build_model(ModelConfig(n_layer=2, n_head=2, d_model=16, seq_len=T),
                       {"vocab_size": V}, seed=0, dtype=dtype)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(k: int, o: OptimConfig, steps: int = 10, l1: float = 0.0, l2: float = 0.0):
    model = tiny()
    opt = build_optimizer(model, o)
    end = StepEnd(grad_clip=1.0,
                  add_penalty_grads=build_penalty(decayed_params(model, o), l1, l2))
    for s in range(steps):
        train_step(model, split_micro_batches(make_batch(s), B // k), opt, FP64, None,
                   StepOptions(), end=end)
    return flat(model)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulation_equals_one_batch_every_optimizer(name):
    o = OptimConfig(weight_decay=0.1, **OPTIMIZERS[name])
    ref = run(1, o)
    assert (ref - flat(tiny())).abs().max() > 1e-4  # the optimizer did move the weights
    for k in (2, 4, 8):
        assert (run(k, o) - ref).abs().max().item() <= 1e-10, k


@pytest.mark.parametrize("k", [1, 4, 8])
def test_accumulation_exact_with_penalties(k):
    o = OptimConfig(name="adam", lr=1e-2, weight_decay=0.0)
    ref = run(1, o, l1=1e-3, l2=1e-2)
    assert (ref - run(1, o)).abs().max() > 1e-6  # the penalties change the result
    assert (run(k, o, l1=1e-3, l2=1e-2) - ref).abs().max().item() <= 1e-10


def test_penalty_gradient_is_autograd_of_penalised_loss():
    l1, l2 = 3e-3, 5e-2
    o = OptimConfig(name="sgd", momentum=0.0, lr=0.1, weight_decay=0.0)
    x, y = make_batch(0)
    # Reference: autograd through mean CE + l1·Σ|w| + l2/2·Σw² on the decayed weights.
    ref = tiny()
    wd = decayed_params(ref, o)
    assert wd and all(p.dim() >= 2 for p in wd)
    loss = sum_cross_entropy(ref(x), y) / (y != IGNORE_INDEX).sum()
    loss = loss + l1 * sum(p.abs().sum() for p in wd) + l2 / 2 * sum(p.pow(2).sum() for p in wd)
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    got = tiny()
    end = StepEnd(add_penalty_grads=build_penalty(decayed_params(got, o), l1, l2))
    train_step(got, split_micro_batches((x, y), 2), build_optimizer(got, o), FP64, None,
               StepOptions(), end=end)
    assert (flat(got) - flat(ref)).abs().max().item() <= 1e-13


def _grads_after_step(end: StepEnd):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    opt.register_step_pre_hook(lambda o, a, k: captured.update(
        g=[p.grad.clone() for p in model.parameters()]))
    res = train_step(model, [make_batch(0)], opt, FP64, None, StepOptions(), end=end)
    return res, captured["g"]


def test_clip_by_global_norm():
    res, raw = _grads_after_step(StepEnd())
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in raw]))
    assert res.grad_norm.item() == pytest.approx(norm.item(), rel=1e-12)
    max_norm = norm.item() / 4
    res, clipped = _grads_after_step(StepEnd(grad_clip=max_norm))
    assert res.grad_norm.item() == pytest.approx(norm.item(), rel=1e-12)  # pre-clip norm
    got = torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped])).item()
    assert got == pytest.approx(max_norm, rel=1e-5)  # torch adds 1e-6 to the divisor
    for a, b in zip(raw, clipped):  # same direction, uniform scale
        torch.testing.assert_close(b, a * (max_norm / (norm.item() + 1e-6)), rtol=1e-12,
                                   atol=0)


def test_clip_by_value():
    _, raw = _grads_after_step(StepEnd())
    v = torch.cat([g.flatten() for g in raw]).abs().max().item() / 3
    _, clipped = _grads_after_step(StepEnd(grad_clip_value=v))
    for a, b in zip(raw, clipped):
        assert torch.equal(b, a.clamp(-v, v))
    assert any((a.abs() > v).any() for a in raw)  # clipping did something


def test_param_groups_decay_only_matrices():
    model = tiny()
    groups = param_groups(model, 0.1, decay_embeddings=False)
    decay = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert names and all(n.endswith("weight") and ".ln_" not in n for n in names)
    assert "wte.weight" not in names and "wpe.weight" not in names
    with_emb = param_groups(model, 0.1, decay_embeddings=True)[0]["params"]
    assert any(p is model.wte.weight for p in with_emb)
    # Weight-norm magnitudes g are scales: not decayed; directions v are.
    wn = apply_weight_norm(tiny())
    decay = {id(p) for p in param_groups(wn, 0.1, False)[0]["params"]}
    for n, p in wn.named_parameters():
        if n.endswith("original0"):
            assert id(p) not in decay
        if n.endswith("original1"):
            assert id(p) in decay


def test_weight_norm_converter_preserves_function_and_tie():
    x, _ = make_batch(0)
    model = tiny()
    before = model(x)
    apply_weight_norm(model)
    assert torch.allclose(model(x), before, rtol=1e-12, atol=1e-12)
    assert model.lm_head.weight is model.wte.weight  # tied head left alone
    wn = [n for n, _ in model.named_parameters() if "parametrizations" in n]
    assert len(wn) == 2 * 2 * 4  # g and v of 4 linear layers in each of 2 blocks


@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "adamw", "adagrad"])
def test_fused_matches_foreach(name):
    a = run(1, OptimConfig(implementation="foreach", **OPTIMIZERS[name]), steps=5)
    b = run(1, OptimConfig(implementation="fused", **OPTIMIZERS[name]), steps=5)
    c = run(1, OptimConfig(implementation="for-loop", **OPTIMIZERS[name]), steps=5)
    assert (a - b).abs().max().item() <= 1e-12 and (a - c).abs().max().item() <= 1e-12


def test_fused_rmsprop_is_a_config_error():
    from scaletrain.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.implementation"):
        build_optimizer(tiny(), OptimConfig(name="rmsprop", implementation="fused"))


def test_weight_norm_and_penalties_in_a_run(tiny_args):
    import json
    import math


    cfg = make_cfg(tiny_args + ["--model.weight_norm=true", "--optim.l1=1e-4",
                                "--optim.l2=1e-3", "--optim.implementation=fused",
                                "--train.steps=3", "--eval.test=false"])
    tr = one_process_trainer(cfg)
    names = [n for n, _ in tr.model.named_parameters()]
    assert sum("parametrizations.weight.original" in n for n in names) == 2 * 2 * 4
    assert tr.step_end.add_penalty_grads.l1 == 1e-4  # the step calls the penalty hook
    summary = tr.fit()
    with open(f"{cfg.run.dir}/metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert math.isfinite(summary["val"]["loss"])
