"""Where the run executes: device, threads, seeding and the process's place in the world.

The process's place in the world is parallel/world.py's `World`, read from the
environment torchrun sets (or handed in by the CLI, which read it once).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from scaletrain.errors import ConfigError
from scaletrain.parallel.world import World


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    threads: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def detect_runtime(device: str, threads: int, world: World | None = None) -> Runtime:
    """`world`: the process's place in the world (default: read from the environment)."""
    w = world or World.from_env()
    dev = pick_device(device, w.local_rank)
    # CPU ranks on one machine share its cores; oversubscription slows every rank down.
    n = threads or max(1, usable_cores() // w.local_size)
    torch.set_num_threads(n)
    return Runtime(dev, w.rank, w.size, w.local_rank, w.local_size, n)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what Slurm's --cpus-per-task,
    taskset, a container's cpuset or a pinned test worker leave it), not the machine's
    count, which os.cpu_count() gives and which oversubscribes a restricted process."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no affinity call
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global streams (dropout uses torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
