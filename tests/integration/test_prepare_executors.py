"""`scaletrain prepare` on datatrove's Ray and Slurm executors (data/executors.py), the way
users run it: a Ray head started here with `ray start --head` on 127.0.0.1 (stopped
after), and a one-node Slurm (slurm-wlm + munge) started by scripts/slurm_single_node.sh.
The prepared files must be byte-identical to the local executor's, and the cluster must
really have run the tasks (its own logs say so). A cluster that is not there, or a
setting it refuses, is one line and exit 2 before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, one_error_line, run_cli
from tests.distributed.spawn import free_port

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ("train.bin", "val.bin", "test.bin", "tokenizer.json")
START_S = 180  # a Ray head starts in ~10 s on an idle 2-core machine; much more under load
SLURM_SCRIPT = REPO / "scripts" / "slurm_single_node.sh"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """4 JSONL files of standard-library sources: 4 read tasks, several split parts."""
    root = tmp_path_factory.mktemp("corpus")
    names = sorted(STDLIB.glob("*.py"))[:40]
    for i in range(4):
        with open(root / f"part{i}.jsonl", "w", encoding="utf-8") as f:
            for p in names[i::4]:
                f.write(json.dumps({"text": p.read_text(encoding="utf-8")}) + "\n")
    return root


def _prepare(out: Path, corpus: Path, *extra: str, env: dict | None = None) -> Path:
    """The prepared directory; the cluster's and datatrove's INFO / WARNING lines stay
    in their logs, off the user's console."""
    proc = run_cli("prepare", f"--data.source={corpus}", f"--data.prepared_dir={out}",
                   "--data.vocab_size=300", "--data.prep_workers=2", *extra, env=env,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr[-3000:]
    (prepared,) = [p for p in out.iterdir() if p.is_dir()]
    return prepared


@pytest.fixture(scope="module")
def local_prepared(tmp_path_factory, corpus) -> Path:
    return _prepare(tmp_path_factory.mktemp("local"), corpus)


def _same_as_local(prepared: Path, local: Path) -> None:
    for name in FILES:
        assert (prepared / name).read_bytes() == (local / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (prepared, local))
    for key in ("stages", "sources", "splits", "counts"):
        assert a[key] == b[key], key


# ---- Ray ---------------------------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_head():
    """(address, session logs dir) of a Ray head on 127.0.0.1 with 2 CPUs."""
    pytest.importorskip("ray")
    # A short temp dir: Ray's Unix sockets live under it (paths <= 107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    ports = [f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    log = open(temp / "head.log", "w")
    # `ray start` is the console script of ray.scripts.scripts; --block keeps it in the
    # foreground as the parent of the head's processes. PYTHONPATH: the workers it
    # starts import scaletrain (the steps) from this checkout.
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start",
         "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}", *ports],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + START_S
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_group(proc)
            pytest.fail("ray head did not start: " + (temp / "head.log").read_text()[-2000:])
        time.sleep(1)
    yield f"127.0.0.1:{port}", temp / "session_latest" / "logs"
    _stop_group(proc)
    shutil.rmtree(temp, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM `ray start --block`, which then stops the head's processes (~3 s; a
    SIGTERM to the whole group instead leaves it waiting on them), and SIGKILL what is
    left of the process group this test started."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_prepare_on_ray_is_byte_identical_to_local(tmp_path, corpus, local_prepared,
                                                  ray_head):
    address, logs = ray_head
    prepared = _prepare(tmp_path, corpus, "--data.executor=ray",
                        f"--data.ray_address={address}")
    _same_as_local(prepared, local_prepared)
    # The cluster ran datatrove's task actors (their stdout files name the actor class).
    actors = [p for p in logs.glob("worker-*.out") if ":actor_name:RankWorker" in p.read_text()]
    assert actors, sorted(p.name for p in logs.iterdir())


def test_ray_address_nobody_listens_at_is_one_line(tmp_path, corpus):
    pytest.importorskip("ray")
    port = free_port()
    proc = run_cli("prepare", f"--data.source={corpus}", f"--data.prepared_dir={tmp_path}/p",
                   "--data.executor=ray", f"--data.ray_address=127.0.0.1:{port}")
    one_error_line(proc, "data.ray_address", f"127.0.0.1:{port}", "ray start --head")
    assert not [p for p in (tmp_path / "p").glob("*") if p.is_dir()]


# ---- Slurm -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """{"SLURM_CONF": ...} of a one-node cluster started by the repo's script."""
    if shutil.which("sbatch") is None:
        why = "sbatch not installed (apt-get install slurm-wlm munge; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    d = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()),
           "SLURMD_PORT": str(free_port())}
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "start", str(d)], env=env,
                          capture_output=True, text=True, timeout=START_S)
    if proc.returncode != 0:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop", str(d)], timeout=60)
        pytest.fail(f"Slurm did not start: {proc.stdout}{proc.stderr}"[-3000:])
    yield {"SLURM_CONF": str(d / "slurm.conf")}, d
    subprocess.run(["bash", str(SLURM_SCRIPT), "stop", str(d)], timeout=60)
    shutil.rmtree(d, ignore_errors=True)


def test_prepare_on_slurm_is_byte_identical_to_local(tmp_path, corpus, local_prepared,
                                                    slurm):
    env, d = slurm
    prepared = _prepare(tmp_path, corpus, "--data.executor=slurm",
                        "--data.slurm_time=00:10:00", env=env)
    _same_as_local(prepared, local_prepared)
    # One job array per stage (read, dedup + split, tokenize), as the controller logged.
    assert (d / "slurmctld.log").read_text().count("_slurm_rpc_submit_batch_job") >= 3


def test_slurm_partition_unknown_is_one_line(tmp_path, corpus, slurm):
    env, _ = slurm
    proc = run_cli("prepare", f"--data.source={corpus}", f"--data.prepared_dir={tmp_path}/p",
                   "--data.executor=slurm", "--data.slurm_partition=debgu", env=env)
    one_error_line(proc, "data.slurm_partition", "'debgu'", "did you mean 'debug'")


def test_sbatch_missing_is_one_line(tmp_path, corpus):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_cli("prepare", f"--data.source={corpus}", f"--data.prepared_dir={tmp_path}/p",
                   "--data.executor=slurm", env={"PATH": str(empty)})
    one_error_line(proc, "data.executor=slurm", "sbatch")


def test_slurm_time_malformed_is_one_line(tmp_path, corpus):
    proc = run_cli("prepare", f"--data.source={corpus}", f"--data.prepared_dir={tmp_path}/p",
                   "--data.executor=slurm", "--data.slurm_time=1h")
    one_error_line(proc, "data.slurm_time", "'1h'")
