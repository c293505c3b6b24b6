"""Shared fixtures: one tiny prepared text corpus per test session, and tiny configs.

The corpus is the first files of the built-in python-stdlib source with a small BPE
vocabulary, prepared once per session (per xdist worker) into a temporary directory, so
tests never re-prepare and never touch the user's `data/` cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist with no more workers than cores, pin each worker (and so every
    process it starts) to a core of its own: a test's processes then size their torch
    threads from that one core (train/runtime.py usable_cores) instead of each taking
    every core of the machine, which oversubscribed it: a tiny run's CPU time went
    mostly to spinning OpenMP threads (sys time 1.5x its user time, measured under load)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if 1 < workers <= len(cores):
        try:
            os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
        except OSError:  # a sandbox that forbids it: run unpinned, as before
            pass

# Tiny GPT on tiny data: every test that trains a text model starts from these.
# eval.test_batches=2: the final test evaluation reads 2 batches, not the whole test split
# (~4,000 windows, ~500 forwards at batch 8: most of a tiny run's time); the tests that
# need the whole split (test_eval_portability, test_document_masking_cli) set 0 again.
TINY_DATA = ["--data.source=python-stdlib", "--data.max_files=24", "--data.vocab_size=384",
             "--data.prep_workers=1"]
TINY_GPT = ["--model.name=gpt", "--model.n_layer=2", "--model.n_head=2", "--model.d_model=32",
            "--model.seq_len=32", "--train.batch_size=8", "--train.log_interval=1",
            "--train.progress=off", "--eval.interval=0", "--eval.batches=2",
            "--eval.batch_size=8", "--eval.test_batches=2", "--schedule.warmup_steps=0"]


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """A prepared-data cache holding the tiny corpus (prepared once per session)."""
    from scaletrain.config import build_config
    from scaletrain.config.load import parse_overrides
    from scaletrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    pairs, _ = parse_overrides(TINY_DATA + [f"--data.prepared_dir={root}"])
    prepare(build_config(None, pairs).data, progress=False)
    return root


@pytest.fixture
def tiny_args(prepared_dir, tmp_path) -> list[str]:
    """CLI overrides for a tiny GPT run in a fresh run directory on the prepared corpus."""
    return TINY_DATA + TINY_GPT + [f"--data.prepared_dir={prepared_dir}",
                                   f"--run.dir={tmp_path / 'run'}"]


@pytest.fixture
def tiny_cfg(tiny_args):
    """`tiny_args` as a validated Config; pass extra overrides with `tiny_cfg_with`."""
    return make_cfg(tiny_args)


def make_cfg(args: list[str]):
    from scaletrain.config import build_config
    from scaletrain.config.load import parse_overrides

    pairs, rest = parse_overrides(args)
    assert not rest, rest
    return build_config(None, pairs)


def one_process_trainer(cfg):
    """The Trainer of `cfg` on this one process, handed its runtime and layout as `train`
    hands them (resolved once, here; the Trainer resolves nothing itself)."""
    # Imported here, as in make_cfg: torch is heavy and many tests never build a trainer.
    from scaletrain.config.dims import resolve_dims
    from scaletrain.parallel.world import World
    from scaletrain.train.runtime import detect_runtime
    from scaletrain.train.trainer import Trainer

    world = World()
    return Trainer(cfg, detect_runtime(cfg.train.device, cfg.train.threads, world),
                   resolve_dims(cfg.parallel, world.size))


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
    """Run `python -m scaletrain ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "scaletrain", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def one_error_line(proc, *fragments) -> str:
    """The user-error contract: exit 2, exactly one stderr line holding `fragments`, no
    traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
