"""The checkpoint session driven directly: fake Stateful objects, a scripted fault
monitor and rollback, and the decisions it returns (checkpoint/decisions.py).

Every object handed to it refuses attribute writes (the session must change state only
through the objects' own methods), and the model and optimizer keep their attributes.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from scaletrain.checkpoint.decisions import CONTINUE, RolledBack, Stop
from scaletrain.checkpoint.session import CheckpointSession
from scaletrain.train.host_reads import LaggedReads
from tests.conftest import make_cfg


class Frozen:
    """Fails on any attribute write after construction (which uses object.__setattr__)."""

    def __setattr__(self, name, value):
        raise AssertionError(f"the session wrote {type(self).__name__}.{name}")

    def __delattr__(self, name):
        raise AssertionError(f"the session deleted {type(self).__name__}.{name}")


class Box(Frozen):
    """A small Stateful: a dict saved and restored through its own methods."""

    def __init__(self, **values):
        object.__setattr__(self, "values", dict(values))

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, d: dict) -> None:
        self.values.update(d)


class ScriptedFaults(Frozen):
    """A fault monitor whose events and verdict the test sets."""

    def __init__(self):
        object.__setattr__(self, "events", [])
        object.__setattr__(self, "verdict", {"roll_back": False})

    def pop_event(self):
        return self.events.pop(0) if self.events else None

    def should_roll_back(self) -> bool:
        return self.verdict["roll_back"]


class LoadNewest(Frozen):
    """A rollback: the newest valid checkpoint through the manager it is handed."""

    lr_factor = 0.5

    def __call__(self, manager):
        target = manager.newest_valid()
        return None if target is None else manager.load(*target)["step"]


def attrs(obj) -> dict:
    """Which object each attribute holds (a write replaces one)."""
    return {k: id(v) for k, v in vars(obj).items()}


@pytest.fixture
def parts(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader, state, faults, log = Box(pos=0), Box(step=0), ScriptedFaults(), []
    cfg = make_cfg([f"--run.dir={tmp_path}", "--checkpoint.interval=2"])
    session = CheckpointSession(
        {"model": model, "optimizer": optimizer, "loader": loader, "train_state": state},
        cfg=cfg, run_dir=tmp_path, metrics_path=tmp_path / "metrics.jsonl", rank=0,
        is_main=True, device=torch.device("cpu"), reads=LaggedReads(0, torch.device("cpu")),
        log=log.append, faults=faults, rollback=LoadNewest(), on_signal=True)
    return session, model, optimizer, loader, state, faults, log


def ckpts(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())


def test_decisions_continue_rolled_back_and_stop_after_a_signal(parts, tmp_path, capsys):
    session, model, optimizer, loader, state, faults, log = parts
    before = attrs(model), attrs(optimizer)
    assert session.resume() is None  # nothing to resume from
    assert session.after_step(1, best_step=0) == CONTINUE
    state.values["step"] = 2
    assert session.after_step(2, best_step=0) == CONTINUE  # interval: saved
    assert ckpts(tmp_path) == ["step-00000002"]
    assert (attrs(model), attrs(optimizer)) == before

    # A fault below the rollback threshold: logged, the run goes on (and saves on time).
    state.values.update(step=4)
    loader.values.update(pos=32)
    faults.events.append({"event": "nonfinite_loss", "loss": float("nan")})
    assert session.after_step(4, best_step=0) == CONTINUE
    assert log[-1]["kind"] == "fault" and log[-1]["step"] == 4
    assert ckpts(tmp_path) == ["step-00000002", "step-00000004"]

    # Too many in a row: rolled back to the newest checkpoint, nothing saved at step 6.
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    state.values.update(step=6)
    faults.events.append({"event": "loss_spike", "loss": 9.0})
    faults.verdict["roll_back"] = True
    assert session.after_step(6, best_step=0) == RolledBack(step=4)
    assert state.values == {"step": 4} and loader.values == {"pos": 32}
    assert torch.equal(model.weight, saved_weight)  # the checkpoint's weights
    assert [r.get("event") for r in log[-2:]] == ["loss_spike", "rollback"]
    assert log[-1] == {"kind": "fault", "step": 6, "event": "rollback", "to_step": 4,
                       "lr_factor": 0.5}
    assert ckpts(tmp_path) == ["step-00000002", "step-00000004"]
    faults.verdict["roll_back"] = False

    # SIGTERM: the flag is set, the step finishes, a checkpoint is saved and the decision
    # says stop with 128 + 15; the handlers are the caller's again.
    original = signal.getsignal(signal.SIGTERM)
    session.install_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGTERM) != original  # else the kill ends pytest
        os.kill(os.getpid(), signal.SIGTERM)
        before = attrs(model), attrs(optimizer)
        assert session.after_step(5, best_step=0) == Stop(step=5, exit_code=143)
    finally:
        session.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) == original
    assert (attrs(model), attrs(optimizer)) == before
    assert ckpts(tmp_path)[-1] == "step-00000005"
    assert "stopped by SIGTERM after step 5; checkpoint step-00000005 saved" \
        in capsys.readouterr().err


def test_no_checkpoint_to_roll_back_to_goes_on(parts, tmp_path):
    session, *_, faults, log = parts
    faults.events.append({"event": "nonfinite_loss", "loss": float("nan")})
    faults.verdict["roll_back"] = True
    assert session.after_step(1, best_step=0) == CONTINUE
    assert log[-1] == {"kind": "fault", "step": 1, "event": "rollback_impossible",
                       "reason": "no valid checkpoint"}
    session.at_end(1, best_step=0)  # the final save, then the writer is closed
    assert ckpts(tmp_path) == ["step-00000001"]


@pytest.mark.parametrize("is_main", [True, False])
def test_the_session_hands_the_manager_metrics_and_the_best_step(tmp_path, is_main):
    """Passed down, not set on the manager from outside: rank 0's metrics.jsonl size is
    saved with each checkpoint (a resume cuts the file back to it), other ranks save none;
    keep_best keeps the best step's checkpoint beside the newest `keep`."""
    import json

    model = torch.nn.Linear(3, 2)
    cfg = make_cfg([f"--run.dir={tmp_path}", "--checkpoint.interval=2",
                    "--checkpoint.keep=1", "--checkpoint.keep_best=true"])
    metrics = tmp_path / "metrics.jsonl"
    session = CheckpointSession(
        {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
         "train_state": Box(step=0)}, cfg=cfg, run_dir=tmp_path, metrics_path=metrics,
        rank=0, is_main=is_main, device=torch.device("cpu"),
        reads=LaggedReads(0, torch.device("cpu")), log=[].append, on_signal=False)
    for step in (2, 4, 6):
        metrics.write_text("{}\n" * step)
        assert session.after_step(step, best_step=2) == CONTINUE
    session.at_end(6, best_step=2)
    assert ckpts(tmp_path) == ["step-00000002", "step-00000006"]
    extra = json.loads((tmp_path / "checkpoints" / "step-00000006" / "extra-rank0.json")
                       .read_text())
    assert extra.get("metrics_bytes") == (18 if is_main else None)
