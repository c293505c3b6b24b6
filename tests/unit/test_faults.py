"""Numerical faults: a NaN batch is skipped exactly; spikes are caught, clean runs are not;
too many bad steps in a row roll back to the last checkpoint past the bad batches."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.config.schema import FaultsConfig, ModelConfig, OptimConfig
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer, build_scheduler
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.faults import FaultMonitor, Rollback, roll_back
from scaletrain.optim.step_end import StepEnd
from scaletrain.train.step import StepOptions, train_step
from tests.conftest import make_cfg, one_process_trainer

CPU = PrecisionPolicy("fp32", torch.device("cpu"))


def image_batch(i: int, poison: bool = False):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 1, 8, 8, generator=g)
    if poison:
        x[3, 0, 2, 2] = float("nan")  # one NaN pixel poisons the loss and every gradient
    return x, torch.randint(0, 5, (8,), generator=g)


def mlp_run(batches, guard: FaultMonitor | None):
    model = build_model(ModelConfig(name="mlp", hidden=16), {"input_shape": (1, 8, 8),
                                                              "num_classes": 5}, seed=0)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))
    end = StepEnd(grad_clip=1.0, guard=guard.guard if guard else None)
    skipped = [train_step(model, [b], opt, CPU, None, StepOptions(), end=end).skipped
               for b in batches]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), skipped


def test_nan_batch_is_skipped_bitwise_as_if_never_seen():
    clean = [image_batch(i) for i in range(6)]
    poisoned = clean[:3] + [image_batch(99, poison=True)] + clean[3:]
    monitor = FaultMonitor(FaultsConfig())
    got, skipped = mlp_run(poisoned, monitor)
    want, _ = mlp_run(clean, None)
    assert skipped == [False, False, False, True, False, False, False]
    assert torch.equal(got, want)
    assert math.isfinite(got.sum().item())


def test_without_the_guard_the_nan_batch_destroys_the_model():
    poisoned = [image_batch(0), image_batch(99, poison=True), image_batch(1)]
    got, _ = mlp_run(poisoned, None)  # the check above is not vacuous
    assert not math.isfinite(got.sum().item())


def test_spike_detector_flags_a_spike_and_not_noise():
    m = FaultMonitor(FaultsConfig(spike_sigmas=6.0, spike_window=128, spike_min_history=32))
    g = torch.Generator().manual_seed(0)
    noisy = (3.0 + 0.05 * torch.randn(200, generator=g)).tolist()
    assert [m.classify(v, 1.0) for v in noisy[:1]] == [None]
    for v in noisy:
        assert m.guard(torch.tensor(v), torch.tensor(1.0))
    assert not m.guard(torch.tensor(3.0 + 1.0), torch.tensor(1.0))  # 20 sigma
    assert m.pop_event()["event"] == "loss_spike"
    assert not m.guard(torch.tensor(float("nan")), torch.tensor(1.0))
    assert m.pop_event()["event"] == "nonfinite_loss" and m.consecutive == 2


def test_clean_1000_step_run_has_no_false_spike_detections():
    """Replay of a recorded clean run (tests/unit/data, its command inside) through the
    default detector (6 sigma over 128 steps, armed after 64).

    Equivalent to detecting live: the detector only reads (loss, grad norm), and with no
    detection no step is skipped, so the live run is exactly the recorded one. Recording
    avoids 1000 real steps per test run (~20 s on this machine).
    """
    curve = json.loads((Path(__file__).parent / "data" / "tiny_gpt_1000_steps.json")
                       .read_text())
    assert len(curve["loss"]) == 1000
    monitor = FaultMonitor(FaultsConfig())
    detections = [i + 1 for i, (loss, norm) in enumerate(zip(curve["loss"], curve["grad_norm"]))
                  if not monitor.guard(torch.tensor(loss), torch.tensor(norm))]
    assert detections == []
    assert monitor.threshold() is not None  # armed for the last 936 steps
    assert curve["loss"][-1] < curve["loss"][0] - 1.0  # a real, learning run
    # The same curve with one step pushed up by 10 std is caught (the check can fail).
    spiky = list(curve["loss"])
    window = spiky[400:528]
    mean = sum(window) / len(window)
    std = (sum((x - mean) ** 2 for x in window) / len(window)) ** 0.5
    spiky[528] = mean + 10 * std
    monitor = FaultMonitor(FaultsConfig())
    hits = [i + 1 for i, loss in enumerate(spiky)
            if not monitor.guard(torch.tensor(loss), torch.tensor(1.0))]
    assert hits == [529]


def test_rollback_restores_the_checkpoint_skips_the_bad_batches_and_lowers_lr(tmp_path):
    from scaletrain.data.loader import StatefulLoader

    class Windows:  # 100 tiny samples; the loader only needs len() and batch()
        def __len__(self):
            return 100

        def batch(self, idx):
            return torch.as_tensor(idx), torch.as_tensor(idx)

    cfg = make_cfg([f"--run.dir={tmp_path}", "--model.name=mlp", "--data.source=digits",
                    "--schedule.name=constant", "--faults.max_consecutive=3",
                    "--faults.rollback_lr_factor=0.5"])
    model = build_model(cfg.model, {"input_shape": (1, 8, 8), "num_classes": 5}, seed=0)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg)
    loader = StatefulLoader(Windows(), 4, seed=0)
    monitor = FaultMonitor(cfg.faults)
    mgr = CheckpointManager(tmp_path, cfg, model=model, optimizer=opt,
                            stateful={"scheduler": sched, "loader": loader, "faults": monitor})
    for i in range(2):
        loader.next()
        train_step(model, [image_batch(i)], opt, CPU, None, StepOptions(),
                   end=StepEnd(guard=monitor.guard))
        sched.step()
    mgr.save(2)
    saved = [p.detach().clone() for p in model.parameters()]
    lr = opt.param_groups[0]["lr"]
    opts, end = StepOptions(), StepEnd(guard=monitor.guard)
    for i in range(3):  # three poisoned batches in a row
        loader.next()
        assert train_step(model, [image_batch(i, poison=True)], opt, CPU, None, opts,
                          end=end).skipped
    assert monitor.should_roll_back()
    with torch.no_grad():  # pretend the bad steps had damaged something
        next(model.parameters()).add_(1.0)
    position = loader.state_dict()
    assert roll_back(mgr, loader, sched, opt, cfg.faults.rollback_lr_factor) == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved))
    assert loader.state_dict() == position  # the offending batches are not replayed
    assert opt.param_groups[0]["lr"] == lr * 0.5 and sched.base_lrs[0] == lr * 0.5
    assert monitor.consecutive == 0
    json.dumps(monitor.state_dict())  # checkpointable as JSON


def test_trainer_logs_skips_and_rolls_back_past_the_bad_batches(tiny_args):
    """A real Trainer: batches 5 and 6 (1-based) produce NaN logits; with
    max_consecutive=2 both steps are skipped and logged, the run rolls back to the
    step-4 checkpoint, does not replay batches 5-6, and finishes."""
    from scaletrain.metrics import read_metrics

    cfg = make_cfg(tiny_args + ["--train.steps=8", "--checkpoint.interval=2",
                                "--faults.max_consecutive=2", "--eval.test=false",
                                "--train.threads=1"])
    trainer = one_process_trainer(cfg)
    bs = cfg.train.batch_size
    poisoned = []

    def poison(module, args, out):
        consumed = trainer.loader.state_dict()["pos"] // bs  # batches taken so far
        if module.training and consumed in (5, 6):
            poisoned.append(consumed)
            return out * float("nan")
        return out

    trainer.model.register_forward_hook(poison)
    summary = trainer.fit()
    recs = read_metrics(cfg.run.dir + "/metrics.jsonl")
    faults = [(r["step"], r["event"]) for r in recs if r["kind"] == "fault"]
    assert poisoned == [5, 6]
    assert faults == [(5, "nonfinite_loss"), (6, "nonfinite_loss"), (6, "rollback")]
    assert [r for r in recs if r["kind"] == "fault"][-1]["to_step"] == 4
    train_steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # 5, 6 again, on new batches
    assert summary["steps"] == 8 and summary["skipped_steps"] == 2
    assert trainer.loader.state_dict()["pos"] // bs == 10  # 8 steps + 2 skipped batches


def test_detector_that_could_never_arm_is_a_config_error():
    import pytest

    from scaletrain.errors import ConfigError

    with pytest.raises(ConfigError, match="faults.spike_min_history=200 exceeds"):
        make_cfg(["--faults.spike_min_history=200", "--faults.spike_window=128"])
    make_cfg(["--faults.spike_min_history=200", "--faults.spike_sigmas=0"])  # off: fine


def test_a_rollback_with_no_checkpoint_counts_the_bad_steps_afresh():
    """Nothing to go back to: the monitor counts bad steps in a row from 0 again (through
    its own method), so the run keeps skipping them instead of asking again each step."""
    cfg = make_cfg(["--faults.max_consecutive=2"])
    monitor = FaultMonitor(cfg.faults)
    for _ in range(2):
        monitor.record(float("nan"), 1.0, "nonfinite_loss")
    assert monitor.should_roll_back()
    no_checkpoint = SimpleNamespace(newest_valid=lambda: None)
    state = SimpleNamespace(skipped_steps=2)
    assert Rollback(monitor, None, None, None, state, 1.0)(no_checkpoint) is None
    assert monitor.consecutive == 0 and not monitor.should_roll_back()
    assert state.skipped_steps == 2
