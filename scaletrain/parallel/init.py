"""Process-group setup and teardown, and turning a lost peer into a clear exit.

torchrun (or `scaletrain train --nproc N`) provides RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT; `init_process_group` with the `env://` default reads them, so the same code
runs on one node or many. Backend by device: gloo for CPU tensors, NCCL for CUDA.

The `timeout` bounds every collective: if a peer dies, gloo notices the closed socket
at once ("Connection closed by peer"), and if a peer hangs, the collective fails after
`timeout` (gloo: "Timed out waiting ... for recv"; NCCL enforces it through its
watchdog when `TORCH_NCCL_ASYNC_ERROR_HANDLING` is on, the default since torch 2.2).
`peer_guard` turns either into one line naming the rank, instead of a hang or a
backend traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from scaletrain.errors import ConfigError


def pick_backend(requested: str, device: torch.device) -> str:
    """'auto' -> NCCL on CUDA, gloo on CPU; an explicit choice is checked against both."""
    backend = requested if requested != "auto" else ("nccl" if device.type == "cuda"
                                                      else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend='nccl' needs CUDA devices (train.device); "
                          "use 'gloo' or 'auto' on CPU")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("parallel.backend='nccl' but this torch build has no NCCL")
    return backend


def init_distributed(world: int, device: torch.device, backend: str = "auto",
                     timeout_s: float = 300.0) -> bool:
    """Join the default process group when `world` > 1; True if this call created it.

    A group that already exists (a test harness, an outer framework) is reused.
    """
    if world <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    kwargs = {}
    if device.type == "cuda":
        # Binds the group to this rank's GPU: NCCL communicators are created eagerly
        # and a wrong device is an error here, not a hang later.
        kwargs["device_id"] = device
    dist.init_process_group(pick_backend(backend, device),
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return True


def destroy_distributed() -> None:
    """Leave the default process group (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_comm_failure(e: BaseException) -> bool:
    """A failure of a collective (dead or hung peer), as opposed to a bug of ours."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
        "timed out", "Broken pipe", "NCCL communicator was aborted", "ProcessGroupGloo",
        "Socket Timeout", "ECONNRESET"))


@contextlib.contextmanager
def peer_guard(rank: int, timeout_s: float):
    """Run a distributed section; a lost peer ends the process with one clear line.

    Prints the line to stderr and exits with code 1 (not the user's mistake, DESIGN.md
    §3), without a traceback. The run resumes from its last checkpoint.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - filtered below; anything else re-raised
        if not (dist.is_available() and dist.is_initialized()) or not _is_comm_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        msg = (f"scaletrain: rank {rank}: a collective failed — another process died or "
               f"stopped responding (parallel.timeout_s={timeout_s:g}); stopping this "
               f"rank. Resume from the last checkpoint. [{type(e).__name__}: {first}]")
        print(msg, file=sys.stderr, flush=True)
        # Do not destroy the group: that is itself a collective-like shutdown which can
        # block on the dead peer. os._exit skips atexit handlers that would do the same.
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
