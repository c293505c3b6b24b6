"""`scaletrain train --nproc N` ends like one process (issue 13 item 15): a layout the
world cannot run is refused before torchrun starts (one line, exit 2), and a rank that
fails afterwards ends the launcher with that rank's one line and its documented exit code
(README "Exit codes"), without torchrun's ChildFailedError report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DATA = ["--data.source=python-stdlib", "--data.max_files=20", "--data.prep_workers=1"]
TINY = ["--model.n_layer=4", "--model.d_model=32", "--model.n_head=2", "--model.seq_len=32",
        "--train.batch_size=8", "--train.micro_batch_size=2", "--train.log_interval=1",
        "--eval.interval=0", "--eval.test=false", "--schedule.warmup_steps=0",
        "--train.progress=off"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def scaletrain(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaletrain", *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prep")
    proc = scaletrain("prepare", *DATA, "--data.vocab_size=300", f"--data.prepared_dir={d}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return d


@pytest.fixture(scope="module")
def base_run(prepared, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    proc = scaletrain("train", *DATA, "--data.vocab_size=300", *TINY,
                      f"--data.prepared_dir={prepared}", f"--run.dir={run}", "--train.steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    return lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--nproc", "3", "--parallel.pp=3"], "pipeline's 3 stages"),
    (["--nproc", "3", "--parallel.tp=3"], "parallel.tp=3 must divide model.n_head=2"),
    (["--nproc", "2", "--train.compile=true", "--train.compile_scope=model"],
     "compile_scope='model' needs one process"),
    # LoRA runs under FSDP2 (tests/distributed/test_lora_fsdp_cli.py), not TP / PP
    (["--nproc", "2", "--parallel.tp=2", "--finetune.lora_rank=2", "INIT"],
     "with DDP or FSDP2, not TP / PP / EP (here tp=2, pp=1"),
    (["--nproc", "2", "--parallel.pp=2", "--finetune.freeze=[\"wte.*\"]", "INIT"],
     "with DDP or FSDP2, not TP / PP / EP (here tp=1, pp=2"),
    # the pipeline passes whole sequences between stages; SP leaves each rank a slice
    (["--nproc", "4", "--parallel.tp=2", "--parallel.pp=2",
      "--parallel.sequence_parallel=true"], "sequence_parallel with parallel.pp > 1"),
    # valid on one process; the launcher judges it on the 2 ranks it would start, as
    # they would (issue 14 item 2), not on a world of 1 with dp_shard=-1 counted as 1
    (["--nproc", "2", "--parallel.dp_shard=-1", "--train.descent=stochastic"],
     "cannot run data-parallel"),
    (["--nproc", "2", "--parallel.pp=2", "TEACHER"],
     "distill.teacher with parallel.pp > 1"),
])
def test_layouts_the_world_cannot_run_fail_before_torchrun(args, fragment, prepared,
                                                           base_run, tmp_path):
    args = [f"--init.from={base_run}" if a == "INIT" else
            f"--distill.teacher={base_run}" if a == "TEACHER" else a for a in args]
    t = time.monotonic()
    proc = scaletrain("train", *DATA, "--data.vocab_size=300", *TINY,
                      f"--data.prepared_dir={prepared}", f"--run.dir={tmp_path}/r", *args)
    line = one_line(proc)  # no torchrun banner: it never started
    assert fragment in line and line.startswith("scaletrain train: error:"), line
    assert time.monotonic() - t < 60
    assert not (tmp_path / "r").exists()


def test_an_error_only_the_ranks_can_see_ends_with_exit_2_and_no_report(tmp_path):
    # A 301-token vocabulary is only known once the data is prepared (on the ranks).
    proc = scaletrain("train", *DATA, "--data.vocab_size=301", *TINY,
                      f"--data.prepared_dir={tmp_path}/p", f"--run.dir={tmp_path}/r",
                      "--train.steps=1", "--parallel.tp=2", "--parallel.dp_shard=1",
                      "--nproc", "2", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert errors and all("parallel.tp=2 must divide the vocabulary size" in ln
                          for ln in errors), proc.stderr[-3000:]
    for noise in ("Traceback", "ChildFailedError", "FAILED", "exitcode"):
        assert noise not in proc.stderr, proc.stderr[-3000:]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the ranks under the launcher (launcher -> torchrun -> ranks)."""
    ranks = {}
    for agent in _children(launcher):
        for pid in _children(agent):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for kv in env:
                if kv.startswith(b"RANK="):
                    ranks[int(kv[5:])] = pid
    return ranks


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_hung_rank_ends_the_launcher_with_rank_0s_line_and_exit_1(prepared, tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-run: rank 0's collective times out after
    parallel.timeout_s, it prints its one line and exits 1; the launcher then ends with
    that code and no torchrun report."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", "train", *DATA,
                             "--data.vocab_size=300", *TINY, f"--data.prepared_dir={prepared}",
                             f"--run.dir={run}", "--train.steps=100000",
                             "--checkpoint.on_signal=false", "--parallel.timeout_s=3",
                             "--nproc", "2"],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ranks = {}
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists()
                   and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "no step in 120 s"
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        t_stop = time.monotonic()
        while _alive(ranks[0]) and time.monotonic() - t_stop < 60:
            time.sleep(0.1)
        waited = time.monotonic() - t_stop
        os.kill(ranks[1], signal.SIGCONT)  # let torchrun's SIGTERM end it (else 30 s)
        _, err = proc.communicate(timeout=90)
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert waited < 3 + 30, waited  # the timeout plus slack for this shared machine
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if "a collective failed" in ln]
    assert lines and lines[0].startswith("scaletrain: rank 0:"), err[-3000:]
    for noise in ("Traceback", "ChildFailedError", "FAILED", "exitcode"):
        assert noise not in err, err[-3000:]


def test_the_launcher_exits_with_the_first_failed_rank_s_code():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from scaletrain.parallel.launch import exit_code

    def failure(rank: int, code: int, at: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")
        f.timestamp = at
        return f

    killed_first = ChildFailedError("scaletrain", {1: failure(1, -9, 10), 0: failure(0, 1, 11)})
    assert exit_code(killed_first) == 128 + 9  # as a shell reports a signal
    config_error = ChildFailedError("scaletrain", {0: failure(0, 2, 5), 1: failure(1, 2, 6)})
    assert exit_code(config_error) == 2
