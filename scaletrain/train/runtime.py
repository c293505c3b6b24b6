"""Where the run executes: device, threads, seeding and the process's place in the world.

torchrun (or `scaletrain train --nproc N`) sets RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE; without them this is a single process.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from scaletrain.errors import ConfigError


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


def detect_runtime(device: str, threads: int) -> Runtime:
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    dev = pick_device(device, local_rank)
    # CPU ranks on one machine share its cores; oversubscription slows every rank down.
    n = threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(n)
    return Runtime(dev, rank, world, local_rank, local_world, n)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global streams (dropout uses torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
