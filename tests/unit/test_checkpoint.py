"""CheckpointManager: round trip of every model and optimizer, async staging, atomicity,
full disk, keep-last-k, safety of loading, metrics truncation, config compatibility."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from scaletrain.checkpoint import manifest as mf
from scaletrain.checkpoint.compat import differences
from scaletrain.checkpoint.manager import CheckpointManager, list_checkpoints
from scaletrain.checkpoint.session import truncate_metrics
from scaletrain.errors import CheckpointError
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer, build_scheduler
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.state import TrainState
from scaletrain.optim.step_end import StepEnd
from scaletrain.train.step import StepOptions, train_step
from tests.conftest import REPO, make_cfg

FACTS = {"vocab_size": 37, "input_shape": (1, 8, 8), "num_classes": 5}
OPTIMS = ["sgd", "adam", "adamw", "adagrad", "rmsprop"]


def cfg_for(tmp_path, model="gpt", optim="adamw", *extra):
    args = [f"--run.dir={tmp_path}", f"--model.name={model}", f"--optim.name={optim}",
            "--model.n_layer=1", "--model.n_head=2", "--model.d_model=16",
            "--model.seq_len=8", "--model.hidden=16", "--model.channels=4",
            "--model.n_blocks=1", "--model.dropout=0.1", "--schedule.warmup_steps=2",
            "--train.steps=10", *extra]
    if model != "gpt":
        args.append("--data.source=digits")
    return make_cfg(args)


class Parts:
    """Model, optimizer, scheduler, state and manager of a tiny run, seeded by `seed`."""

    def __init__(self, cfg, seed=0):
        self.cfg = cfg
        self.model = build_model(cfg.model, FACTS, seed=seed)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg)
        self.state = TrainState()
        self.mgr = CheckpointManager(cfg.run.dir, cfg, model=self.model, optimizer=self.opt,
                                     stateful={"scheduler": self.sched, "train_state": self.state})

    def step(self, i):
        g = torch.Generator().manual_seed(i)
        if self.cfg.model.name == "gpt":
            x = torch.randint(0, FACTS["vocab_size"], (4, 8), generator=g)
            y = torch.randint(0, FACTS["vocab_size"], (4, 8), generator=g)
        else:
            x = torch.randn(4, 1, 8, 8, generator=g)
            y = torch.randint(0, FACTS["num_classes"], (4,), generator=g)
        train_step(self.model, [(x, y)], self.opt, PrecisionPolicy("fp32", torch.device("cpu")),
                   None, StepOptions(), end=StepEnd(grad_clip=1.0))
        self.sched.step()
        self.state.step += 1

    def flat(self):
        return torch.cat([p.detach().flatten() for p in self.model.parameters()])


@pytest.mark.parametrize("model", ["gpt", "mlp", "cnn"])
@pytest.mark.parametrize("optim", OPTIMS)
def test_round_trip_every_model_and_optimizer(tmp_path, model, optim):
    cfg = cfg_for(tmp_path, model, optim)
    a = Parts(cfg)
    for i in range(2):
        a.step(i)
    a.mgr.save(2)
    lr_saved = a.opt.param_groups[0]["lr"]
    a.step(2)  # dropout draws from the RNG state saved with the checkpoint
    want = a.flat()

    b = Parts(cfg, seed=7)  # different weights: everything must come from the checkpoint
    torch.manual_seed(12345)  # and a different RNG state
    b.mgr.maybe_resume()
    assert b.state.step == 2 and b.sched.last_epoch == 2
    assert b.opt.param_groups[0]["lr"] == lr_saved
    assert len(b.opt.state_dict()["state"]) == len(a.opt.state_dict()["state"])
    b.step(2)
    assert torch.equal(b.flat(), want)


def test_async_save_snapshots_state_at_the_call(tmp_path):
    cfg = cfg_for(tmp_path, "gpt", "adamw", "--checkpoint.async_save=true")
    a = Parts(cfg)
    a.step(0)
    before = a.flat().clone()
    a.mgr.save(1)
    with torch.no_grad():  # the step goes on while the write is in flight
        for p in a.model.parameters():
            p.add_(1.0)
    a.mgr.close()
    assert (tmp_path / "checkpoints" / "step-00000001" / mf.MANIFEST).is_file()
    b = Parts(cfg, seed=3)
    b.mgr.maybe_resume()
    assert torch.equal(b.flat(), before)


def test_keep_newest_k_and_best(tmp_path):
    cfg = cfg_for(tmp_path, "mlp", "sgd", "--checkpoint.keep=2", "--checkpoint.keep_best=true")
    a = Parts(cfg)
    for s in range(1, 6):
        a.mgr.save(s, best_step=1)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 4, 5]


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                             async_save):
    cfg = cfg_for(tmp_path, "mlp", "adam", f"--checkpoint.async_save={async_save}")
    a = Parts(cfg)
    a.step(0)
    good = a.mgr.save(1)
    a.mgr.wait()

    def full(self, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError) as e:
        a.mgr.save(2)
        a.mgr.wait()  # an async write fails in the background: reported here
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "step-00000001" in msg
    assert [p.name for _, p in list_checkpoints(tmp_path / "checkpoints")] == [good.name]
    assert not (tmp_path / "checkpoints" / "step-00000002.tmp").exists()
    mf.verify(good)


# What a real full disk made torch's zip writer raise inside DCP's save (issue 13 item
# 12, seen on a 1 MiB tmpfs): a RuntimeError without the errno.
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_as_torch_reports_it_is_one_line(tmp_path, monkeypatch, async_save):
    cfg = cfg_for(tmp_path, "mlp", "adam", f"--checkpoint.async_save={async_save}")
    a = Parts(cfg)
    a.step(0)
    good = a.mgr.save(1)
    a.mgr.wait()

    def full(self, *args, **kw):
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError) as e:
        a.mgr.save(2)
        a.mgr.wait()
    msg = str(e.value)
    assert "\n" not in msg and "stopped short" in msg and "MiB free" in msg, msg
    assert "step-00000001" in msg and "untouched" in msg
    assert [p.name for _, p in list_checkpoints(tmp_path / "checkpoints")] == [good.name]
    mf.verify(good)


def test_a_bug_during_save_stays_an_internal_error(tmp_path, monkeypatch):
    a = Parts(cfg_for(tmp_path, "mlp", "adam"))
    a.step(0)

    def bug(self, *args, **kw):
        raise RuntimeError("expected a tensor, got NoneType")

    monkeypatch.setattr(FileSystemWriter, "write_data", bug)
    with pytest.raises(RuntimeError, match="expected a tensor"):
        a.mgr.save(1)


def test_kill_during_write_leaves_previous_checkpoint_intact(tmp_path):
    """A process SIGKILLed after writing the data, before the manifest and rename."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.unit.test_checkpoint import Parts, cfg_for
        from scaletrain.checkpoint import manifest
        import pathlib
        a = Parts(cfg_for(pathlib.Path({str(tmp_path)!r}), "gpt", "adamw"))
        a.step(0); a.mgr.save(1); a.step(1)
        manifest.write_manifest = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        a.mgr.save(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120)
    assert proc.returncode == -9
    root = tmp_path / "checkpoints"
    assert (root / "step-00000002.tmp" / "__0_0.distcp").is_file()  # killed mid-save
    assert [s for s, _ in list_checkpoints(root)] == [1]
    b = Parts(cfg_for(tmp_path, "gpt", "adamw"))
    assert b.mgr.maybe_resume() == 1
    b.step(1)
    b.mgr.save(2)  # the next save replaces the leftover
    assert [s for s, _ in list_checkpoints(root)] == [1, 2]
    assert not (root / "step-00000002.tmp").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(tmp_path, "mlp", "sgd")
    a = Parts(cfg)
    ck = a.mgr.save(1)
    (ck / ".metadata").write_bytes(pickle.dumps(Evil()))
    m = json.loads((ck / mf.MANIFEST).read_text())
    mf.write_manifest(ck, step=1, config=m["config"], world_size=1)  # checksums "match"
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        Parts(cfg).mgr.maybe_resume()
    assert not (tmp_path / "pwned").exists()


def test_verify_names_the_bad_file(tmp_path):
    cfg = cfg_for(tmp_path, "mlp", "sgd")
    mgr = Parts(cfg).mgr
    ck1, ck2 = mgr.save(1), mgr.save(2)
    data = ck1 / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="__0_0.distcp: truncated"):
        mf.verify(ck1)
    (ck2 / "extra-rank0.json").unlink()
    with pytest.raises(CheckpointError, match="extra-rank0.json: missing"):
        mf.verify(ck2)


def test_truncate_metrics_drops_later_steps_and_partial_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 1},
             {"kind": "train", "step": 2}, {"kind": "eval", "step": 2},
             {"kind": "train", "step": 3}]
    p.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tr')
    assert truncate_metrics(p, 2) == 2
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [0, 1, 2, 2]
    truncate_metrics(p, None)
    assert p.read_text() == ""


def test_compat_lists_incompatible_differences_only(tmp_path):
    from scaletrain.config import to_dict

    a = to_dict(cfg_for(tmp_path))
    b = to_dict(cfg_for(tmp_path, "gpt", "adamw", "--train.steps=20", "--train.log_interval=3",
                        "--model.d_model=32", "--precision.dtype=bf16"))
    assert differences(a, b) == ["model.d_model: 16 -> 32"]  # bf16 keeps fp32 params
    c = to_dict(cfg_for(tmp_path, "gpt", "sgd", "--precision.dtype=fp64"))
    assert differences(a, c) == ["optim.name: 'adamw' -> 'sgd'",
                                 "precision.dtype: 'fp32' -> 'fp64' (parameters float32 -> "
                                 "float64)"]


def test_grad_scaler_and_loader_state_round_trip(tmp_path):
    from scaletrain.data.loader import StatefulLoader

    class Samples:
        def __len__(self):
            return 50

        def batch(self, idx):
            return torch.as_tensor(idx), torch.as_tensor(idx)

    def parts(seed):
        p = Parts(cfg_for(tmp_path, "mlp", "adamw", "--precision.dtype=fp16"), seed=seed)
        p.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        p.loader = StatefulLoader(Samples(), 8, seed=3, workers=2)
        p.mgr.stateful.update(scaler=p.scaler, loader=p.loader)
        return p

    a = parts(0)
    a.scaler.scale(torch.ones(()))  # the scale tensor exists from the first scale() on
    a.scaler.update(new_scale=1024.0)
    for _ in range(9):  # past the end of the first epoch (50 samples)
        a.loader.next()
    a.mgr.save(1)
    want = [a.loader.next()[0] for _ in range(3)]
    b = parts(1)
    assert b.mgr.maybe_resume() == 1
    assert b.scaler.get_scale() == 1024.0
    assert b.scaler.state_dict() == a.scaler.state_dict()
    got = [b.loader.next()[0] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    a.loader.close()
    b.loader.close()


def test_load_applies_the_current_configs_lr_and_settings(tmp_path):
    """Issue 13 item 3 at the manager: after a load, the peak LR, weight decay and the
    next step's LR are the current config's; a rollback's LR factor is kept."""
    a = Parts(cfg_for(tmp_path, "mlp", "adamw"))
    for i in range(3):
        a.step(i)
    a.sched.base_lrs = [b * 0.5 for b in a.sched.base_lrs]  # as faults.roll_back does
    a.mgr.save(3)
    b = Parts(cfg_for(tmp_path, "mlp", "adamw", "--optim.lr=1e-4", "--optim.weight_decay=0.01",
                      "--train.steps=20"))
    b.mgr.maybe_resume()
    from scaletrain.optim.schedules import lr_multiplier

    m = lr_multiplier(b.cfg)
    for g, base in zip(b.opt.param_groups, b.sched.base_lrs):
        assert g["initial_lr"] == 1e-4 and base == 1e-4 * 0.5
        assert g["lr"] == base * m(3)
        assert g["weight_decay"] in (0.01, 0.0)  # decayed / no-decay group
    assert {g["weight_decay"] for g in b.opt.param_groups} == {0.01, 0.0}


def test_load_applies_the_current_plateau_settings(tmp_path):
    a = Parts(cfg_for(tmp_path, "mlp", "adam", "--schedule.name=plateau"))
    for i in range(4):
        a.step(i)
    a.mgr.save(4)
    b = Parts(cfg_for(tmp_path, "mlp", "adam", "--schedule.name=plateau", "--optim.lr=1e-4",
                      "--schedule.gamma=0.5", "--schedule.patience=7"))
    b.mgr.maybe_resume()
    assert b.sched.plateau.factor == 0.5 and b.sched.plateau.patience == 7
    assert [g["lr"] for g in b.opt.param_groups] == pytest.approx([1e-4] * len(b.opt.param_groups))
