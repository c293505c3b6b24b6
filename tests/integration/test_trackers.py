"""Experiment trackers (metrics/trackers.py): a real `mlflow server` started here on
127.0.0.1 and W&B in offline mode get every metrics.jsonl record (read back through
MLflow's client and from W&B's offline run file), the config as parameters, summary /
config / plots as artefacts, and a resumed run continues the same tracker run. A
tracker that cannot work (a missing package, an MLflow or W&B server that does not
answer, W&B online without a login) is refused with one line before anything runs."""

from __future__ import annotations

import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict

import pytest

from scaletrain.errors import ConfigError
from scaletrain.metrics import read_metrics
from scaletrain.metrics.mlflow_sink import MlflowSink, tracking_uri
from scaletrain.metrics.sinks import scalar_fields
from scaletrain.metrics.trackers import check_trackers
from tests.conftest import make_cfg, one_error_line, one_process_trainer, run_cli
from tests.distributed.spawn import free_port
from tests.wandb_records import offline_run

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")
from mlflow.tracking import MlflowClient  # noqa: E402  (after the importorskip)

SERVER_START_S = 300  # ~15 s on an idle 2-core machine, a minute or more under load


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` as users start it (SQLite store, artefacts proxied), stopped after."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5) as r:
                if r.read().strip() == b"OK":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
        time.sleep(1)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def _expected(run_dir) -> dict[str, set]:
    """{tag: {(step, value)}} of every number in metrics.jsonl, as the trackers name them."""
    out = defaultdict(set)
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for tag, value in scalar_fields(record).items():
            out[tag].add((int(record["step"]), value))
    return out


def _two_sessions(args: list[str]) -> None:
    """Train 2 steps (checkpoint at 2), then resume the same run to 4 steps."""
    proc = run_cli("train", *args, "--train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("train", *args, "--train.steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mlflow_server_gets_every_record_and_a_resume_continues_its_run(
        mlflow_server, tiny_args, tmp_path):
    run = tmp_path / "run"
    _two_sessions([*tiny_args, "--metrics.mlflow=true", f"--metrics.mlflow_uri={mlflow_server}",
                   "--metrics.mlflow_experiment=resume-test", "--checkpoint.interval=2",
                   "--eval.interval=2"])
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([exp.experiment_id])
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    assert [r.info.run_id for r in runs] == [run_id]  # the resume continued it
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.seed"] == "1337" and got.data.params["model.name"] == "gpt"
    expected = _expected(run)
    assert {s for s, _ in expected["train/loss"]} == {1, 2, 3, 4}
    assert expected["eval_val/loss"]
    for tag, points in expected.items():
        history = {(m.step, m.value) for m in client.get_metric_history(run_id, tag)}
        assert points <= history, tag
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "config.toml", "plots"} <= names
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(run_id, "plots")}


def test_wandb_offline_run_holds_every_record_and_a_resume_keeps_its_id(tiny_args, tmp_path):
    run = tmp_path / "run"
    _two_sessions([*tiny_args, "--metrics.wandb_project=scaletrain-test",
                   "--metrics.wandb_mode=offline", "--checkpoint.interval=2",
                   "--eval.interval=2"])
    wid = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    offline = offline_run(run)
    assert offline["ids"] == [wid, wid]  # two sessions, one W&B run (wandb sync joins them)
    assert offline["config"]["train"]["seed"] == 1337
    logged = defaultdict(set)
    for row in offline["history"]:
        for tag, value in row.items():
            if "/" in tag:
                logged[tag].add((int(row["step"]), value))
    for tag, points in _expected(run).items():
        assert points <= logged[tag], tag
    assert {"summary.json", "config.toml", "plots/loss.png"} <= set(offline["files"])


def test_fault_records_reach_both_trackers(tiny_args, tmp_path):
    """A real Trainer whose batches 5 and 6 give NaN logits (tests/unit/test_faults.py):
    its fault records (two skipped steps, a rollback to step 4) reach MLflow and the
    W&B offline run at their steps, under the tags TensorBoard gives them."""
    cfg = make_cfg([*tiny_args, "--train.steps=8", "--checkpoint.interval=2",
                    "--faults.max_consecutive=2", "--eval.test=false", "--train.threads=1",
                    "--metrics.mlflow=true", f"--metrics.mlflow_uri={tmp_path / 'mlruns'}",
                    "--metrics.wandb_project=faults", "--metrics.wandb_mode=offline"])
    trainer = one_process_trainer(cfg)
    bs = cfg.train.batch_size

    def poison(module, args, out):
        consumed = trainer.loader.state_dict()["pos"] // bs  # batches taken so far
        return out * float("nan") if module.training and consumed in (5, 6) else out
    trainer.model.register_forward_hook(poison)
    trainer.fit()
    run = tmp_path / "run"
    faults = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "fault"]
    assert [(r["step"], r["event"]) for r in faults] == \
        [(5, "nonfinite_loss"), (6, "nonfinite_loss"), (6, "rollback")]
    # Their numbers by tag; NaN (a skipped step's loss) compares unequal to itself.
    want = {tag: points for tag, points in _expected(run).items() if tag.startswith("fault/")}
    want = {tag: {(s, v) for s, v in points if not math.isnan(v)} for tag, points in want.items()}
    assert want.get("fault/to_step") == {(6, 4.0)}, want
    ids = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    logged = defaultdict(set)
    for row in offline_run(run)["history"]:
        for tag, value in row.items():
            if tag.startswith("fault/"):
                logged[tag].add((int(row["step"]), value))
    for tag, points in want.items():
        history = {(m.step, m.value) for m in client.get_metric_history(ids["mlflow"]["run_id"],
                                                                        tag)}
        assert points <= history, (tag, points, history)
        assert points <= logged[tag], (tag, points, logged[tag])


def test_mlflow_local_directory_is_an_sqlite_store(tmp_path):
    """The default metrics.mlflow_uri: a directory with mlflow.db and the artefacts."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    sink = MlflowSink(str(tmp_path / "mlruns"), "local", run_dir, run_id=None,
                      params={"optim.lr": "0.001"})
    sink.write({"kind": "train", "step": 3, "loss": 2.5, "moe_imbalance": {"1": 1.25}})
    sink.close()
    store, _ = tracking_uri(str(tmp_path / "mlruns"))
    client = MlflowClient(tracking_uri=store)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert [(m.step, m.value) for m in client.get_metric_history(sink.run_id, "train/loss")] \
        == [(3, 2.5)]
    assert client.get_metric_history(sink.run_id, "train/moe_imbalance/1")[0].value == 1.25
    assert client.get_run(sink.run_id).data.params == {"optim.lr": "0.001"}
    assert [a.path for a in client.list_artifacts(sink.run_id)] == ["summary.json"]
    assert list((tmp_path / "mlruns" / "artifacts").rglob("summary.json"))


def test_unreachable_mlflow_server_is_one_line_before_anything_runs(tiny_args, tmp_path):
    port = free_port()  # nothing listens there
    proc = run_cli("train", *tiny_args, "--metrics.mlflow=true",
                   f"--metrics.mlflow_uri=http://127.0.0.1:{port}", "--train.steps=1")
    one_error_line(proc, f"metrics.mlflow_uri=http://127.0.0.1:{port}",
                   "no MLflow tracking server")
    assert not (tmp_path / "run").exists()


def test_unreachable_wandb_server_is_one_line_before_anything_runs(tiny_args, tmp_path):
    """W&B online with a login but no server that answers (no network, a wrong
    WANDB_BASE_URL): one line, exit 2, no run directory, instead of wandb.init failing
    or hanging after the run has started."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_cli("train", *tiny_args, "--metrics.wandb_project=p",
                   "--metrics.wandb_mode=online", "--train.steps=1",
                   env={"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": url})
    one_error_line(proc, "metrics.wandb_mode='online'", f"no W&B server answers at {url}",
                   "--metrics.wandb_mode=offline")
    assert not (tmp_path / "run").exists()


def test_a_wandb_server_that_answers_passes_the_check(monkeypatch):
    """Any HTTP reply counts as reachable: W&B's API root answers a bare GET with 404."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        check_trackers(make_cfg(["--metrics.wandb_project=p",
                                 "--metrics.wandb_mode=online"]).metrics)
    finally:
        server.shutdown()
        server.server_close()


def test_missing_tracker_packages_and_online_wandb_without_login(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "wandb") else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'scaletrain\[mlflow\]'"):
        check_trackers(make_cfg(["--metrics.mlflow=true"]).metrics)
    with pytest.raises(ConfigError, match=r"pip install 'scaletrain\[wandb\]'"):
        check_trackers(make_cfg(["--metrics.wandb_project=p"]).metrics)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    with pytest.raises(ConfigError, match="needs a W&B login"):
        check_trackers(make_cfg(["--metrics.wandb_project=p",
                                 "--metrics.wandb_mode=online"]).metrics)
    check_trackers(make_cfg(["--metrics.wandb_project=p"]).metrics)  # auto: offline
