"""Parameter-server mode (issue #7): parity of sync with single-process training, the SSP
staleness bound, a killed worker, and exact resume (async staleness and convergence:
test_paramserver_async.py, through the CLI).

Each run spawns `world` processes (servers first, then workers) with the torchrun
environment (spawn.py) and calls `train_ps` in each; rank 0 returns the run's summary.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from spawn import run_distributed
from tests.conftest import TINY_DATA, TINY_GPT, make_cfg

PARITY = ["--precision.dtype=fp64", "--train.steps=10", "--optim.lr=1e-2",
          "--train.micro_batch_size=2", "--eval.test=false"]


def _ps_rank(rank: int, world: int, args: list[str], hook=None):
    from scaletrain.paramserver import train_ps

    return train_ps(make_cfg(args), worker_hook=hook)


def _kill_second_worker(worker) -> None:
    """Worker 1 dies (SIGKILL: no goodbye message) after its third step."""
    if worker.w == 1:
        def on_step(clock):
            if clock == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        worker.on_step = on_step


def run_ps(args, servers: int, workers: int, *, hook=None, timeout=90, expect_exit=None):
    args = list(args) + ["--parallel.mode=ps", f"--parallel.ps_servers={servers}"]
    out = run_distributed(_ps_rank, servers + workers, args, hook, timeout=timeout,
                          expect_exit=expect_exit)
    return out[0]


def records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def max_param_diff(a, b) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def single_run(prepared_dir, tmp_path_factory):
    """The single-process reference on the combined batch (fp64)."""
    from scaletrain.config.dims import resolve_dims
    from scaletrain.parallel.world import World
    from scaletrain.train.trainer import train

    d = tmp_path_factory.mktemp("single") / "run"
    cfg = make_cfg(TINY_DATA + TINY_GPT + PARITY + [f"--data.prepared_dir={prepared_dir}",
                                                    f"--run.dir={d}"])
    train(cfg, World(), resolve_dims(cfg.parallel, 1))
    return d


@pytest.mark.parametrize("servers,consistency", [(1, "sync"), (2, "sync"), (1, "ssp")])
def test_sync_matches_single_process(single_run, tiny_args, tmp_path, servers, consistency):
    # ssp with s = 0 must be sync, through the clock machinery of ssp.
    extra = [f"--parallel.ps_consistency={consistency}", "--parallel.ps_staleness=0"]
    summary = run_ps(tiny_args + PARITY + extra, servers, 2)
    assert summary["steps"] == 10 and summary["ps_updates"] == 10
    assert summary["staleness_hist"] == {"0": 20}
    assert max_param_diff(single_run, tmp_path / "run") <= 1e-10
    single = [r["loss"] for r in records(single_run, "train")]
    ps = [r["loss"] for r in records(tmp_path / "run", "train")]
    assert ps == pytest.approx(single, rel=1e-12, abs=0)


@pytest.mark.parametrize("s", [1, 3])
def test_ssp_staleness_is_bounded(tiny_args, s):
    args = tiny_args + ["--train.steps=12", "--parallel.ps_consistency=ssp",
                        f"--parallel.ps_staleness={s}", "--parallel.ps_slow_worker=1",
                        "--parallel.ps_slow_delay_s=0.1", "--eval.test=false"]
    summary = run_ps(args, 1, 2)
    run_dir = make_cfg(tiny_args).run.dir
    from pathlib import Path

    train = records(Path(run_dir), "train")
    # log_interval = 1: every applied gradient is counted in exactly one record.
    per_record = [sum(r["staleness_counts"].values()) for r in train]
    assert sum(per_record) == 12 * 2
    assert all(int(k) <= s for r in train for k in r["staleness_counts"])
    assert all(r["staleness_max"] <= s for r in train)
    # The fast worker does run ahead (the bound is reached, not vacuous).
    assert summary["staleness_max"] >= 1


@pytest.mark.parametrize("consistency", ["async", "sync"])
def test_killed_worker_is_dropped(tiny_args, tmp_path, consistency):
    args = tiny_args + ["--train.steps=12", f"--parallel.ps_consistency={consistency}",
                        "--parallel.ps_timeout_s=2", "--eval.test=false"]
    summary = run_ps(args, 1, 2, hook=_kill_second_worker, expect_exit={2: -signal.SIGKILL})
    assert summary["ps_workers_finished"] == 1
    events = records(tmp_path / "run", "ps_event")
    assert [(e["event"], e["worker"]) for e in events] == [("worker_dropped", 1)]
    if consistency == "async":
        # The sample budget (12 steps x 2 workers) is done by worker 0 after worker 1's
        # 3 steps: 21 + 3 pushes.
        assert summary["steps"] == 12 and summary["ps_updates"] == 24
    else:
        # All 12 steps, the last 9 from worker 0 alone, re-weighted by its own tokens:
        # the loss stays a per-token mean (it would halve if divided by the old count).
        assert summary["steps"] == 12 and summary["tokens"] == 3 * 256 + 9 * 128
        train = records(tmp_path / "run", "train")
        assert min(r["loss"] for r in train) > 0.8 * max(r["loss"] for r in train)


def test_resume_restores_servers_bitwise(tiny_args, tmp_path):
    common = tiny_args + ["--train.steps=6", "--checkpoint.interval=3", "--eval.test=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    # Two shards (2 servers), one worker: the cheapest layout with a sharded checkpoint.
    run_ps(common + [f"--run.dir={a}"], 2, 1)
    step3 = a / "checkpoints" / "step-00000003"
    run_ps(common + [f"--run.dir={b}", f"--checkpoint.resume={step3}"], 2, 1)
    for name in ("server-0.pt", "server-1.pt", "coordinator.pt"):
        sa = torch.load(a / "checkpoints/step-00000006" / name, weights_only=True)
        sb = torch.load(b / "checkpoints/step-00000006" / name, weights_only=True)
        _assert_equal(sa, sb, name)
    assert max_param_diff(a, b) == 0.0


def _assert_equal(x, y, where: str) -> None:
    """Bitwise equality of nested checkpoint states (wall time aside)."""
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            if k != "wall_time":
                _assert_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_equal(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where


def test_ps_records_reach_mlflow(tiny_args, tmp_path):
    """Issue 18: the parameter server's records — its train records and the event of a
    dropped worker — reach the run's MLflow run (local store) at their steps, as every
    metrics.jsonl record does."""
    mlflow_client = pytest.importorskip("mlflow.tracking")  # optional: scaletrain[mlflow]
    store = tmp_path / "mlruns"
    args = tiny_args + ["--train.steps=6", "--parallel.ps_consistency=async",
                        "--parallel.ps_timeout_s=2", "--eval.test=false",
                        "--metrics.mlflow=true", f"--metrics.mlflow_uri={store}"]
    # 300 s: rank 0 creates the MLflow store first (a minute on a loaded 2-core machine).
    run_ps(args, 1, 2, hook=_kill_second_worker, expect_exit={2: -signal.SIGKILL},
           timeout=300)
    run = tmp_path / "run"
    events = records(run, "ps_event")
    assert [(e["event"], e["worker"]) for e in events] == [("worker_dropped", 1)]
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    client = mlflow_client.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    got = {(m.step, m.value) for m in client.get_metric_history(run_id, "ps_event/worker")}
    assert got == {(events[0]["step"], 1.0)}
    losses = {(r["step"], r["loss"]) for r in records(run, "train")}
    assert len(losses) > 1
    assert losses <= {(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")}
