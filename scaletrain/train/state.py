"""The counters of a run that change during training (part of every checkpoint)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # target tokens (or samples) trained on, over all ranks
    best_val: float = math.inf  # best validation loss seen
    best_step: int = 0
    skipped_steps: int = 0  # steps whose update was not applied (fp16 overflow, faults)
    wall_time: float = 0.0  # seconds spent in the training loop, over all sessions

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, type(getattr(self, k))(v))
