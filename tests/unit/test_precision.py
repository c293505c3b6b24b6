"""Precision policies: dtypes, fp16 loss scaling, bf16-pure master weights, accuracy.

- fp16: an injected inf gradient skips exactly that step (parameters bitwise unchanged),
  halves the loss scale, and training continues (step level and in a real run, where the
  skip is counted and logged with the scale).
- bf16-pure: parameters bf16, optimizer state and master weights fp32; an update below
  a bf16 ulp accumulates in the master (and is lost without it).
- bf16 and fp16 runs reach a validation loss within 2% of the fp32 run.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer
from scaletrain.precision import PrecisionPolicy
from scaletrain.optim.step_end import StepEnd
from scaletrain.train.step import StepOptions, split_micro_batches, train_step
from tests.conftest import make_cfg, one_process_trainer

CPU = torch.device("cpu")
V, T, B = 61, 12, 8


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def tiny(dtype):
    return build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=T),
                       {"vocab_size": V}, seed=0, dtype=dtype)


@pytest.mark.parametrize("name,param,compute,scaler,master", [
    ("fp32", torch.float32, torch.float32, False, False),
    ("fp64", torch.float64, torch.float64, False, False),
    ("bf16", torch.float32, torch.bfloat16, False, False),
    ("fp16", torch.float32, torch.float16, True, False),
    ("bf16-pure", torch.bfloat16, torch.bfloat16, False, True),
])
def test_policy_table(name, param, compute, scaler, master):
    p = PrecisionPolicy(name, CPU)
    assert (p.param_dtype, p.compute_dtype) == (param, compute)
    assert (p.make_scaler() is not None, p.master_weights) == (scaler, master)
    model = tiny(p.param_dtype)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3),
                          master_weights=p.master_weights)
    res = train_step(model, split_micro_batches(batch(0), 4), opt, p, p.make_scaler(),
                     StepOptions())
    # The loss is computed in fp32 (fp64 for verification runs) whatever the autocast.
    assert res.loss.dtype == (torch.float64 if name == "fp64" else torch.float32)
    assert math.isfinite(res.loss.item())


def test_fp16_inf_gradient_skips_step_halves_scale_and_continues():
    policy = PrecisionPolicy("fp16", CPU)
    model = tiny(torch.float32)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))
    scaler = policy.make_scaler()
    inject = {"on": False}
    target = model.blocks["0"].mlp.c_fc.weight
    target.register_hook(lambda g: torch.full_like(g, math.inf) if inject["on"] else None)

    def step(s):
        return train_step(model, split_micro_batches(batch(s), 4), opt, policy, scaler,
                          StepOptions(), end=StepEnd(grad_clip=1.0))

    assert not step(0).skipped
    scale = scaler.get_scale()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[target].items()}
    inject["on"] = True
    res = step(1)
    inject["on"] = False
    assert res.skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # bitwise
    assert all(torch.equal(v, opt.state[target][k]) for k, v in state_before.items())
    assert scaler.get_scale() == scale / 2
    res = step(2)
    assert not res.skipped and math.isfinite(res.grad_norm.item())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def read_metrics(run_dir: str, kind: str) -> list[dict]:
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_fp16_overflow_is_counted_and_logged_in_a_run(tiny_args):
    cfg = make_cfg(tiny_args + ["--precision.dtype=fp16", "--train.steps=5",
                                "--eval.test=false"])
    tr = one_process_trainer(cfg)
    p = next(tr.model.parameters())
    p.register_hook(lambda g: torch.full_like(g, math.inf) if tr.state.step == 2 else None)
    summary = tr.fit()
    recs = read_metrics(cfg.run.dir, "train")
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1]
    scales = [r["loss_scale"] for r in recs]
    assert scales[2] == scales[1] / 2 and scales[3:] == [scales[2]] * 2
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5
    assert all(math.isfinite(r["loss"]) for r in recs)


def test_bf16_pure_keeps_fp32_master_weights_and_state():
    model = tiny(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3), master_weights=True)
    policy = PrecisionPolicy("bf16-pure", CPU)
    train_step(model, split_micro_batches(batch(0), 4), opt, policy, None, StepOptions())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    states = [opt.state[p] for p in model.parameters()]
    assert all(s["master"].dtype == s["exp_avg"].dtype == s["exp_avg_sq"].dtype
               == torch.float32 for s in states)
    for p, s in zip(model.parameters(), states):  # the model holds the rounded masters
        assert torch.equal(p, s["master"].to(torch.bfloat16))
    assert all(p.grad is None for p in model.parameters())


def _tiny_updates(master: bool) -> torch.Tensor:
    """SGD with lr·grad = 1e-3 on weights of 1.0, 10 steps: each update is below half a
    bf16 ulp at 1.0 (2^-8), so only an fp32 master can accumulate them."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    model = torch.nn.Module()
    model.w = w
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=1e-3, momentum=0.0,
                                             weight_decay=0.0), master_weights=master)
    for _ in range(10):
        w.grad = torch.ones_like(w)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert w.grad is None
    return w.detach().float()


def test_master_weights_accumulate_sub_ulp_updates():
    assert torch.equal(_tiny_updates(master=False), torch.ones(4))  # lost in bf16
    got = _tiny_updates(master=True)  # master 0.99 -> bf16 0.98828125 (nearest)
    assert torch.equal(got, torch.full((4,), 0.99).to(torch.bfloat16).float())


def test_master_weights_round_trip_state_dict():
    def fresh():
        model = tiny(torch.bfloat16)
        return model, build_optimizer(model, OptimConfig(name="adam", lr=1e-3),
                                      master_weights=True)

    policy = PrecisionPolicy("bf16-pure", CPU)
    model, opt = fresh()
    for s in range(3):
        train_step(model, [batch(s)], opt, policy, None, StepOptions())
    state = copy.deepcopy(opt.state_dict())  # as if read back from a checkpoint
    model2, opt2 = fresh()
    opt2.load_state_dict(state)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        m, m2 = opt.state[p]["master"], opt2.state[p2]["master"]
        assert m2.dtype == opt2.state[p2]["exp_avg"].dtype == torch.float32
        assert torch.equal(m, m2) and torch.equal(p, p2) and p2.dtype == torch.bfloat16
    for s in range(3, 5):  # both continue identically
        train_step(model, [batch(s)], opt, policy, None, StepOptions())
        train_step(model2, [batch(s)], opt2, policy, None, StepOptions())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_low_precision_val_loss_within_2_percent_of_fp32(tiny_args):
    losses = {}
    for dtype in ("fp32", "bf16", "fp16", "bf16-pure"):
        cfg = make_cfg(tiny_args + [f"--precision.dtype={dtype}", "--train.steps=30",
                                    "--optim.lr=3e-3", "--schedule.warmup_steps=5",
                                    "--eval.test=false", "--eval.batches=4",
                                    f"--run.dir={tiny_args[-1].split('=', 1)[1]}-{dtype}"])
        losses[dtype] = one_process_trainer(cfg).fit()["val"]["loss"]
    assert losses["fp32"] < 5.5  # it learned (uniform over 384 tokens is 5.95)
    for dtype in ("bf16", "fp16"):
        assert abs(losses[dtype] / losses["fp32"] - 1) < 0.02, losses
