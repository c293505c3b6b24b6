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
    n = threads or max(1, (os.cpu_count() or 1) // w.local_size)
    torch.set_num_threads(n)
    return Runtime(dev, w.rank, w.size, w.local_rank, w.local_size, n)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global streams (dropout uses torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
