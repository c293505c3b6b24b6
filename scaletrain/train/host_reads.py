"""Step values read on the host one step late, so a GPU is never left idle waiting.

On a GPU, `float(t)` / `t.item()` waits for every kernel queued so far: a read inside
step k stops the host from queuing step k+1 until step k has finished, and the device
idles for the host's Python time between steps (launch, optimizer bookkeeping, data).
The training loop needs three values per step on the host: the global target count
(tokens), the fault guard's loss and gradient norm, and the agreed stop flag (a signal
on any rank). With `train.host_reads = "lagged"` each is copied with `non_blocking=True`
into pinned host memory behind a CUDA event when its step produces it, and consumed at
the end of the *next* step, after that step's work is queued: the host waits (if at
all) only for step k to finish while step k+1 is already on the device.

Every rank consumes step k's values at the same point (the end of step k+1), so the
decisions taken from them (roll back, stop) stay in lock-step across ranks. `flush()`
consumes everything (log steps, checkpoint saves, the end). With lag 0 (`every-step`,
the default on CPU, where a read costs nothing) each value is consumed as soon as its
step ends: the plain synchronous loop.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch


class LaggedReads:
    """A FIFO of device values and what to do with them once on the host."""

    def __init__(self, lag: int, device: torch.device):
        self.lag = lag
        self.cuda = device.type == "cuda"
        self._steps: deque[list] = deque()  # per step: [(host tensor, event, callback)]
        self._current: list = []

    def push(self, value: torch.Tensor, on_host: Callable[[list], None]) -> None:
        """Schedule `on_host(value as a list)`; the copy starts now, without a sync."""
        value = value.detach().reshape(-1)
        event = None
        if self.cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = value.cpu()
        self._current.append((host, event, on_host))

    def end_step(self) -> None:
        """Close this step's values; consume those of the step `lag` steps back."""
        self._steps.append(self._current)
        self._current = []
        while len(self._steps) > self.lag:
            self._consume(self._steps.popleft())

    def flush(self) -> None:
        """Consume every scheduled value (waits for the device)."""
        if self._current:
            self.end_step()
        while self._steps:
            self._consume(self._steps.popleft())

    @staticmethod
    def _consume(items: list) -> None:
        for host, event, on_host in items:
            if event is not None:
                event.synchronize()
            on_host(host.tolist())


def resolve_lag(mode: str, device: torch.device) -> int:
    """`train.host_reads` -> the lag in steps: 'auto' lags on CUDA only."""
    if mode == "auto":
        return 1 if device.type == "cuda" else 0
    return 1 if mode == "lagged" else 0
