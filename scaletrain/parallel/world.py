"""`World`: how many processes a run has and which one this is — known in one place.

Inside a process started by torchrun (or `scaletrain train --nproc N`, which starts
torchrun) `World.from_env()` reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, once,
in the CLI's train command or the runtime (train/runtime.py); before the launch, in the
CLI's parent process, the world is the one the launcher is about to start,
`World.launching(nproc)`. Everything else is handed the value (or its `size`): config
validation, the world checks, plan.auto, the trainer — so one config validates the same
in the parent and on every rank (DESIGN.md §6: resolve once, pass down).

This module imports nothing heavy: the CLI's parent process uses it before any torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1
    launched: bool = False  # this process is a rank torchrun started

    @property
    def nnodes(self) -> int:
        """Machines of the world (torchrun starts local_size ranks on each)."""
        return max(1, self.size // max(1, self.local_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """This process's place in the world as torchrun set it; one process without."""
        env = os.environ
        return cls(size=int(env.get("WORLD_SIZE", 1)), rank=int(env.get("RANK", 0)),
                   local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_size=int(env.get("LOCAL_WORLD_SIZE", 1)), launched="RANK" in env)

    @classmethod
    def launching(cls, nproc: int, nnodes: int = 1) -> World:
        """The world a launcher of `nproc` processes on each of `nnodes` machines starts,
        seen from the launcher (rank 0's view: it writes the run directory)."""
        return cls(size=nproc * nnodes, local_size=nproc)
