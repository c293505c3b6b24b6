"""Every learning-rate schedule, checked against its definition.

1. A short real training run per schedule: the `lr` that metrics.jsonl records for each
   step equals the closed form written out independently below, to 1e-12 relative.
2. The multipliers equal torch's own scheduler classes step by step (same definitions).
3. `plateau` follows a scripted sequence of validation losses, composed with warmup.
4. Scheduler state round-trips through state_dict()/load_state_dict().
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaletrain.config import build_config
from scaletrain.optim.schedules import build_scheduler, lr_multiplier, observe_val_loss
from tests.conftest import make_cfg, one_process_trainer

LR, STEPS = 1e-2, 14


def expected_lr(name: str, t: int, *, W=0, D=None, min_lr=0.0, gamma=0.1, step_size=1,
                milestones=(), k=0.0, epoch=1, power=2.0, t0=0, mult=1, frac=0.2,
                shape="sqrt", pct=0.3, div=25.0) -> float:
    """The LR of the step t+1 (t 0-based), from the textbook formulas; independent of
    scaletrain's implementation on purpose."""
    D = D or STEPS - W
    if t < W:
        return LR * (t + 1) / W
    d = t - W
    if name == "constant":
        return LR
    if name == "step":
        return max(min_lr, LR * gamma ** (d // step_size))
    if name == "multistep":
        return max(min_lr, LR * gamma ** sum(1 for m in milestones if m <= d))
    if name == "exponential":
        return max(min_lr, LR * (math.exp(-k * d) if k else gamma ** d))
    if name == "inverse_time":
        return max(min_lr, LR / (1 + k * (d // epoch)))
    p = min(1.0, d / D)
    if name == "linear":
        return min_lr + (LR - min_lr) * (1 - p)
    if name == "polynomial":
        return min_lr + (LR - min_lr) * (1 - p) ** power
    if name == "cosine":
        if t0:
            length = t0
            while d >= length:
                d, length = d - length, length * mult
            p = d / length
        return min_lr + (LR - min_lr) * (1 + math.cos(math.pi * p)) / 2
    if name == "wsd":
        n = max(1, round(frac * D))
        if d < D - n:
            return LR
        q = min(1.0, (d - (D - n)) / n)
        s = {"linear": 1 - q, "cosine": (1 + math.cos(math.pi * q)) / 2,
             "sqrt": 1 - math.sqrt(q)}[shape]
        return min_lr + (LR - min_lr) * s
    if name == "onecycle":  # Smith & Topin 2018, as torch's OneCycleLR defines it
        lo = LR / div
        hi_end = min_lr if min_lr else lo / 1e4
        up = pct * D - 1
        cos = lambda a, b, x: b + (a - b) / 2 * (math.cos(math.pi * x) + 1)  # noqa: E731
        d = min(d, D - 1)
        return cos(lo, LR, d / up) if d <= up else cos(LR, hi_end, (d - up) / (D - 1 - up))
    raise AssertionError(name)


# (case id, CLI overrides, expected_lr keyword arguments)
CASES = [
    ("constant", ["schedule.warmup_steps=3"], {"W": 3}),
    ("step", ["schedule.warmup_steps=2", "schedule.step_size=3", "schedule.gamma=0.5",
              "schedule.min_lr=0.0015"],
     {"W": 2, "step_size": 3, "gamma": 0.5, "min_lr": 0.0015}),
    ("multistep", ["schedule.milestones=[2, 5, 7]", "schedule.gamma=0.3"],
     {"milestones": (2, 5, 7), "gamma": 0.3}),
    ("exponential", ["schedule.gamma=0.8", "schedule.warmup_steps=2", "schedule.min_lr=1e-3"],
     {"gamma": 0.8, "W": 2, "min_lr": 1e-3}),
    ("exponential-continuous", ["schedule.name=exponential", "schedule.decay_rate=0.3"],
     {"name": "exponential", "k": 0.3}),
    ("inverse_time", ["schedule.decay_rate=0.5", "schedule.warmup_steps=1"], {"k": 0.5, "W": 1}),
    ("inverse_time-stairs", ["schedule.name=inverse_time", "schedule.decay_rate=0.5",
                             "schedule.epoch_steps=4"],
     {"name": "inverse_time", "k": 0.5, "epoch": 4}),
    ("linear", ["schedule.warmup_steps=3", "schedule.min_lr=1e-3"], {"W": 3, "min_lr": 1e-3}),
    ("polynomial", ["schedule.power=2", "schedule.min_lr=1e-4", "schedule.decay_steps=8"],
     {"power": 2.0, "min_lr": 1e-4, "D": 8}),
    ("cosine", ["schedule.warmup_steps=4", "schedule.min_lr=1e-3"], {"W": 4, "min_lr": 1e-3}),
    ("cosine-restarts", ["schedule.name=cosine", "schedule.restart_steps=3",
                         "schedule.restart_mult=2", "schedule.min_lr=1e-4",
                         "schedule.warmup_steps=1"],
     {"name": "cosine", "t0": 3, "mult": 2, "min_lr": 1e-4, "W": 1}),
    ("wsd", ["schedule.warmup_steps=2", "schedule.decay_fraction=0.5", "schedule.min_lr=1e-4"],
     {"W": 2, "frac": 0.5, "min_lr": 1e-4}),
    ("wsd-cosine", ["schedule.name=wsd", "schedule.decay_fraction=0.3",
                    "schedule.decay_shape=cosine"], {"name": "wsd", "frac": 0.3,
                                                     "shape": "cosine"}),
    ("onecycle", ["schedule.pct_start=0.3"], {"pct": 0.3}),
    ("onecycle-floor", ["schedule.name=onecycle", "schedule.pct_start=0.4",
                        "schedule.div_factor=10", "schedule.min_lr=1e-5"],
     {"name": "onecycle", "pct": 0.4, "div": 10.0, "min_lr": 1e-5}),
]


def _overrides(case_id: str, extra: list[str]) -> list[str]:
    name = case_id.split("-")[0]
    args = [f"--schedule.name={name}", f"--optim.lr={LR}", f"--train.steps={STEPS}",
            "--schedule.warmup_steps=0", "--eval.test=false", "--optim.name=sgd"]
    return args + [f"--{a}" for a in extra]


def train_records(cfg) -> list[dict]:
    one_process_trainer(cfg).fit()
    lines = (cfg.run.dir + "/metrics.jsonl")
    with open(lines) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.mark.parametrize("case_id,extra,kw", CASES, ids=[c[0] for c in CASES])
def test_logged_lr_matches_closed_form(case_id, extra, kw, tiny_args):
    cfg = make_cfg(tiny_args + _overrides(case_id, extra))
    records = train_records(cfg)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    name = kw.pop("name", case_id)
    for r in records:
        want = expected_lr(name, r["step"] - 1, **kw)
        assert r["lr"] == pytest.approx(want, rel=1e-12, abs=0), (r["step"], r["lr"], want)


def _cfg(*pairs: str, steps: int = 40):
    return build_config(None, [("optim.lr", str(LR)), ("train.steps", str(steps))]
                        + [tuple(p.split("=", 1)) for p in pairs])


def _torch_lrs(sched, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)


TORCH_EQUIVALENTS = [
    (("schedule.name=step", "schedule.step_size=7", "schedule.gamma=0.5"),
     lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5)),
    (("schedule.name=multistep", "schedule.milestones=[3, 10, 11]", "schedule.gamma=0.2"),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3, 10, 11], 0.2)),
    (("schedule.name=exponential", "schedule.gamma=0.9"),
     lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
    (("schedule.name=linear", "schedule.min_lr=0.002"),
     lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, total_iters=40)),
    (("schedule.name=polynomial", "schedule.power=3"),
     lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=40, power=3.0)),
    (("schedule.name=cosine", "schedule.min_lr=0.001"),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=0.001)),
    (("schedule.name=cosine", "schedule.restart_steps=5", "schedule.restart_mult=2",
      "schedule.min_lr=0.001"),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 5, 2, eta_min=0.001)),
    (("schedule.name=onecycle", "schedule.pct_start=0.25"),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, LR, total_steps=40, pct_start=0.25,
                                                   cycle_momentum=False)),
]


@pytest.mark.parametrize("pairs,make", TORCH_EQUIVALENTS,
                         ids=[p[0][0].split("=")[1] + str(i)
                              for i, p in enumerate(TORCH_EQUIVALENTS)])
def test_multipliers_equal_torch_schedulers(pairs, make):
    m = lr_multiplier(_cfg(*pairs))
    ref = _torch_lrs(make(_opt()), 40)
    got = [LR * m(t) for t in range(40)]
    # torch's chainable schedulers recurse from the previous LR: ~1e-15 drift per step.
    assert got == pytest.approx(ref, rel=1e-10, abs=1e-15)


def test_inverse_time_per_epoch_uses_steps_per_epoch():
    cfg = _cfg("schedule.name=inverse_time", "schedule.decay_rate=1.0",
               "schedule.epoch_steps=0")
    m = lr_multiplier(cfg, steps_per_epoch=5)
    assert [m(t) for t in (0, 4, 5, 9, 10)] == [1.0, 1.0, 0.5, 0.5, 1 / 3]


def _closed_form_sequence(cfg, n, split_at=None) -> list[float]:
    opt = _opt()
    sched = build_scheduler(opt, cfg)
    out = []
    for t in range(n):
        if t == split_at:  # a "resume": fresh optimizer + scheduler, state loaded
            state_o, state_s = opt.state_dict(), sched.state_dict()
            opt = _opt()
            sched = build_scheduler(opt, cfg)
            opt.load_state_dict(state_o)
            sched.load_state_dict(state_s)
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if t % 3 == 2:
            observe_val_loss(sched, [5.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0][t // 3])
    return out


@pytest.mark.parametrize("name", ["cosine", "wsd", "plateau"])
def test_state_dict_round_trip(name):
    cfg = build_config(None, [("optim.lr", str(LR)), ("train.steps", "30"),
                              ("schedule.name", name), ("schedule.warmup_steps", "4"),
                              ("schedule.patience", "1"), ("eval.interval", "3")])
    assert _closed_form_sequence(cfg, 30) == _closed_form_sequence(cfg, 30, split_at=13)


def test_plateau_scripted_validation_losses(tiny_args, monkeypatch):
    """eval every 2 steps; warmup 3 steps. Losses seen at steps 0 and 2 are in warmup
    (ignored). From step 4 on: best 3.0, then no improvement (3.0 is not < 3.0*(1-1e-4))
    at steps 6 and 8: with patience 1 the second bad one (step 8) reduces the LR by
    gamma for step 9 on. Step 10 improves (2.0); 12 is bad, 14 bad -> reduce for 15."""
    import scaletrain.train.trainer as trainer_mod

    script = iter([9.0, 8.0, 3.0, 3.0, 3.0, 2.0, 2.5, 2.1, 1.0, 1.0])
    real = trainer_mod.evaluate

    def scripted(*a, **k):
        out = real(*a, **k)
        return {**out, "loss": next(script)}

    monkeypatch.setattr(trainer_mod, "evaluate", scripted)
    cfg = make_cfg(tiny_args + [
        "--schedule.name=plateau", "--schedule.warmup_steps=3", "--schedule.patience=1",
        "--schedule.gamma=0.5", "--schedule.min_lr=0.003", f"--optim.lr={LR}",
        "--train.steps=18", "--eval.interval=2", "--eval.test=false", "--optim.name=sgd"])
    lrs = [r["lr"] for r in train_records(cfg)]
    want = ([LR / 3, 2 * LR / 3] + [LR] * 6  # warmup 1..2, then steps 3..8 at the peak
            + [LR / 2] * 6  # reduced after the eval at step 8
            + [max(0.003, LR / 4)] * 4)  # reduced after step 14, floored at min_lr
    assert lrs == pytest.approx(want, rel=1e-12)


def test_every_schedule_has_an_example_config():
    from pathlib import Path

    from scaletrain.config.schema import ScheduleConfig

    names = ScheduleConfig.__dataclass_fields__["name"].metadata["choices"]
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in names:
        cfg = build_config(str(root / f"schedule-{name}.toml"))
        assert cfg.schedule.name == name
        m = lr_multiplier(cfg) if name != "plateau" else None
        if m is not None:  # every example is a real decay curve, positive throughout
            lrs = [m(t) for t in range(cfg.train.steps)]
            assert min(lrs) > 0 and max(lrs) == pytest.approx(1.0)


@pytest.mark.parametrize("pairs,match", [
    ([("schedule.name", "multistep")], "schedule.milestones"),
    ([("schedule.name", "onecycle"), ("schedule.warmup_steps", "10")], "onecycle"),
    ([("schedule.name", "inverse_time")], "schedule.decay_rate"),
    ([("schedule.name", "plateau"), ("eval.interval", "0")], "eval.interval"),
    ([("schedule.milestones", "[5, 5]")], "distinct"),
    ([("schedule.min_lr", "1.0")], "min_lr"),
    ([("schedule.name", "wsd"), ("schedule.decay_shape", "cubic")], "decay_shape"),
])
def test_bad_schedule_settings_are_config_errors(pairs, match):
    from scaletrain.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        build_config(None, pairs)


def test_plateau_resumes_exactly_from_a_checkpoint(tiny_args):
    """Train 6 steps (eval every step, plateau reducing at every eval, checkpoint every
    2), drop the newest checkpoint, run again: it resumes at step 4 and the LRs and
    losses of steps 5-6 equal the uninterrupted run's."""
    import shutil

    args = tiny_args + ["--schedule.name=plateau", "--schedule.patience=0",
                        "--schedule.threshold=0.5", "--eval.interval=1", "--eval.batches=1",
                        "--checkpoint.interval=2", "--train.steps=6", "--eval.test=false",
                        f"--optim.lr={LR}"]
    full = [(r["step"], r["lr"], r["loss"]) for r in train_records(make_cfg(args))]
    assert len({lr for _, lr, _ in full}) == 6  # the LR changed at every step
    cfg = make_cfg(args)
    shutil.rmtree(f"{cfg.run.dir}/checkpoints/step-00000006")
    again = [(r["step"], r["lr"], r["loss"]) for r in train_records(cfg)]
    assert again[-2:] == full[-2:]
