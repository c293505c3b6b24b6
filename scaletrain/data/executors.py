"""Where the datatrove jobs of `prepare` run: `data.executor` = local | ray | slurm.

Each executor is datatrove's own (`LocalPipelineExecutor`, `RayPipelineExecutor`,
`SlurmPipelineExecutor`) and runs the same steps over the same tasks, so the prepared
files are byte-identical whichever runs them. `run_steps` returns only when every task
of the job is done, because the next stage of `prepare` reads what this one wrote; the
counts come back the same way for all three: each task's stats file under the job's
logging directory (`stats/<rank>.json`, written by datatrove), summed here.

Ray and Slurm tasks run in other processes, maybe on other machines: the work files
live under `data.prepared_dir` (absolute paths), which must be a filesystem they share,
and the nodes need the same Python environment (scaletrain, datatrove, tokenizers).
`check_executor` tests what can be tested before any work starts (Ray reachable,
`sbatch` installed, the partition exists) and turns a miss into one line (exit 2).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.utils.stats import MetricStats

from scaletrain.config.schema import DataConfig
from scaletrain.data.dt_steps import QuietExecutor, quiet_logs
from scaletrain.errors import ConfigError

RAY_CONNECT_TIMEOUT_S = 5.0
"""How long the TCP probe of data.ray_address waits: a head answers at once."""

SLURM_POLL_S = 2.0
"""How often the launching process asks `squeue` whether the job array is still there."""

SLURM_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}"
                        r"|\d+-\d+:\d{2}:\d{2}|infinite|unlimited)$")
"""The --time formats sbatch accepts (sbatch(1), "-t, --time")."""


class TaskFailed(RuntimeError):
    """A task of a Ray / Slurm job did not complete (an internal error: exit 1); the
    message carries the last line of its log, since the logs go with the work dir."""


def check_executor(dcfg: DataConfig) -> None:
    """ConfigError (one line) when the chosen executor cannot run here: Ray not installed
    or not reachable at data.ray_address; `sbatch` / `sinfo` missing, the controller not
    answering, an unknown data.slurm_partition or a malformed data.slurm_time."""
    if dcfg.executor == "ray":
        _connect_ray(dcfg.ray_address)
    elif dcfg.executor == "slurm":
        if not SLURM_TIME.match(dcfg.slurm_time):
            raise ConfigError(f"data.slurm_time: '{dcfg.slurm_time}' is not a Slurm time "
                              "limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
        _slurm_partition(dcfg.slurm_partition)


def run_steps(steps: list, tasks: int, workers: int, logs: Path,
              dcfg: DataConfig) -> dict[str, int]:
    """Run `steps` as one datatrove job of `tasks` tasks, at most `workers` at once, on
    `dcfg.executor`, with its logs and completions in `logs`; returns when every task is
    done, with the stats of every step summed over the tasks."""
    # datatrove's loguru logger prints every task's INFO lines to stderr by default;
    # `prepare` prints its own summary, so only errors go there (the rest: `logs`).
    quiet_logs()
    workers = max(1, min(workers, tasks))
    if dcfg.executor == "local":
        QuietExecutor(steps, tasks=tasks, workers=workers, logging_dir=str(logs),
                      start_method=start_method()).run()
    elif dcfg.executor == "ray":
        _connect_ray(dcfg.ray_address)
        RayPipelineExecutor(steps, tasks=tasks, workers=workers, logging_dir=str(logs),
                            cpus_per_task=dcfg.ray_cpus_per_task).run()
        _check_completed(logs, tasks, "ray", logs / "logs")  # Ray copies task logs there
    elif dcfg.executor == "slurm":
        _run_slurm(steps, tasks, workers, logs, dcfg)
    else:  # the schema's choices make this unreachable from a config
        raise ValueError(f"unknown executor {dcfg.executor!r}")
    return _summed_stats(logs, tasks)


def start_method() -> str:
    """How the local executor starts its worker processes: "fork" when this process is
    a plain one (Linux, one Python thread, torch not loaded), else datatrove's default,
    "forkserver".

    A forked worker starts at once with every module of this process; a forkserver one
    is a fresh interpreter that imports datatrove and the steps' modules again (~1.5 s
    unloaded, ~3 s of a 1 MB `prepare` on this shared machine, measured). fork is unsafe
    where threads may hold locks, and torch's CUDA runtime and thread pools do not
    survive it (PyTorch notes, "multiprocessing best practices"): so `prepare` run by
    `train` (torch loaded) keeps "forkserver". numpy's BLAS and tokenizers' thread pools
    handle fork themselves (pthread_atfork)."""
    if sys.platform != "linux" or "torch" in sys.modules or threading.active_count() > 1:
        return "forkserver"
    return "fork"


def _summed_stats(logs: Path, tasks: int) -> dict[str, int]:
    """{stat name: total over tasks and steps}, from each task's `stats/<rank>.json`
    (read from files, not from `run()`, which the Ray and Slurm executors do not return
    and the local one does not either when every task was already complete)."""
    totals: dict[str, int] = defaultdict(int)
    for rank in range(tasks):
        with open(logs / "stats" / f"{rank:05d}.json", encoding="utf-8") as f:
            steps = json.load(f)  # [{"name", "time_stats", "stats": {key: metric}}]
        # MetricStats.from_dict, not PipelineStats.from_json: the latter (datatrove
        # 0.10.1) leaves the metrics as the raw JSON values (an int or a dict).
        for step in steps:
            for key, metric in step["stats"].items():
                totals[key] += int(MetricStats.from_dict(metric).total)
    return totals


def _check_completed(logs: Path, tasks: int, executor: str, extra_logs: Path) -> None:
    """TaskFailed naming the first task without a completion mark and the last error
    line of its log: datatrove's task log, else the executor's own (`extra_logs`: Slurm
    writes `<job>_<array index>.out`, with what failed before Python started)."""
    done = {p.name for p in (logs / "completions").glob("*")}
    missing = [r for r in range(tasks) if f"{r:05d}" not in done]
    if not missing:
        return
    rank = missing[0]
    found = [p for p in [logs / "logs" / f"task_{rank:05d}.log",
                         *sorted(extra_logs.glob(f"*_{rank}.out"))] if p.is_file()]
    last = _last_line(found[0]) if found else "no log (the task never started)"
    raise TaskFailed(f"data.executor={executor}: {len(missing)} of {tasks} tasks of "
                     f"'{logs.name}' did not complete; task {rank}: {last}")


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["empty log"])[-1][-300:]


# ---- Ray --------------------------------------------------------------------------


def _connect_ray(address: str) -> None:
    """Connect this process to the Ray cluster at `address` once (Ray's connection is
    per process); ConfigError when Ray is missing or nothing answers there."""
    try:
        # Imported here, not at the top: `import ray` takes ~1.5 s, which every other
        # command that imports the data package would pay for nothing.
        import ray
    except ImportError:
        raise ConfigError("data.executor=ray needs the 'ray' package "
                          "(pip install ray, the version of requirements.txt)") from None
    if ray.is_initialized():
        return
    if address != "auto":
        _probe(address)
    try:
        # The driver prints nothing: workers' output stays in the cluster's logs.
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.ray_address: cannot connect to a Ray cluster at "
                          f"'{address}': {first}") from None


def _probe(address: str) -> None:
    """ConfigError unless something accepts TCP connections at host:port; ray.init on a
    dead address retries for a long time before it gives up."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"data.ray_address: '{address}' is not host:port or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"data.ray_address: no Ray head answers at {address} ({e}); "
                          f"start one with `ray start --head --port={port}`") from None


# ---- Slurm ------------------------------------------------------------------------


class _SlurmJob(SlurmPipelineExecutor):
    """datatrove's Slurm executor without its stats-merging job: the launching process
    waits for the array and sums the stats itself (`_summed_stats`)."""

    def launch_merge_stats(self):
        pass


def _run_slurm(steps: list, tasks: int, workers: int, logs: Path,
               dcfg: DataConfig) -> None:
    """Submit the job array, wait until it leaves the queue, check every task finished."""
    job = _SlurmJob(
        steps, tasks=tasks, workers=workers, logging_dir=str(logs),
        time=dcfg.slurm_time, partition=_slurm_partition(dcfg.slurm_partition),
        cpus_per_task=dcfg.slurm_cpus_per_task, mem_per_cpu_gb=dcfg.slurm_mem_per_cpu_gb,
        qos=dcfg.slurm_qos, job_name=f"scaletrain-{logs.name}",
        # The tasks run `launch_pickled_pipeline` (datatrove's) of this environment.
        env_command=f"export PATH={Path(sys.executable).parent}:$PATH",
        requeue_signals=None, mail_user=None)
    try:
        job.run()
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"data.executor=slurm: sbatch refused the job: "
                          f"{(e.output or b'').decode(errors='replace').strip()}") from None
    if job.job_id not in (None, -1):
        try:
            _wait_slurm(str(job.job_id))
        except BaseException:
            # Interrupted (Ctrl-C, a kill): the tasks would go on writing into a work
            # directory that is about to be removed.
            subprocess.run(["scancel", str(job.job_id)], capture_output=True)
            raise
    _check_completed(logs, tasks, "slurm", Path(job.slurm_logs_folder))


def _wait_slurm(job_id: str) -> None:
    """Block until job `job_id` (every task of the array) is neither pending nor running."""
    while True:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"],
                              capture_output=True, text=True)
        # squeue fails ("Invalid job id") once the controller has forgotten the job.
        if proc.returncode != 0 or not proc.stdout.strip():
            return
        time.sleep(SLURM_POLL_S)


def _slurm_partition(partition: str) -> str:
    """`partition`, or the default partition when '', after checking with `sinfo` that
    the controller answers and knows it; ConfigError otherwise."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError("data.executor=slurm: sbatch / sinfo are not on PATH (Slurm's "
                          "client commands must be installed where prepare runs)")
    proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ConfigError(f"data.executor=slurm: sinfo failed: {why}")
    names = [p.strip() for p in proc.stdout.split() if p.strip()]
    default = [p.rstrip("*") for p in names if p.endswith("*")]
    known = [p.rstrip("*") for p in names]
    if not partition:
        if not default:
            raise ConfigError("data.slurm_partition: the cluster has no default partition; "
                              f"name one of: {', '.join(known)}")
        return default[0]
    if partition not in known:
        near = difflib.get_close_matches(partition, known, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"data.slurm_partition: no partition '{partition}' (the cluster "
                          f"has: {', '.join(known) or 'none'}){hint}")
    return partition
