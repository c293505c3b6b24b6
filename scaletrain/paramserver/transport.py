"""The transport: `torch.distributed.rpc` with the TensorPipe agent.

Why RPC rather than c10d send/recv: a parameter server answers whichever worker calls,
in whatever order, while others are mid-computation — requests with replies, served
concurrently by a thread pool. c10d point-to-point needs both sides to post matching
send/recv calls (a server loop guessing who speaks next, or a receive-from-any-source
plus a header protocol), and a dead peer breaks the shared gloo mesh. With RPC a worker
that dies simply stops calling; the other workers and the servers go on (checked in
tests/distributed/test_paramserver.py). TensorPipe moves tensors without pickling them
(shared memory on one host, TCP across hosts) and reuses torchrun's rendezvous
(MASTER_ADDR/MASTER_PORT, or the agent's store), so no socket is opened by hand.

Caveat: TensorPipe is in maintenance mode (pytorch/tensorpipe README, Dec 2025); it
still ships and works in torch 2.13. Every call site goes through this module, so a
switch to another agent stays local.

Every process is named by its global rank, `rank{r}`; ranks [0, ps_servers) serve.
"""

from __future__ import annotations

import torch.distributed.rpc as rpc


def name(rank: int) -> str:
    return f"rank{rank}"


def start(rank: int, world: int, timeout_s: float, threads: int = 16) -> None:
    """Join the RPC world (blocks until every process has joined).

    `timeout_s` is the default limit of one call; waits that may be longer (a worker
    waiting for a slow peer in sync/ssp) pass their own.
    """
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=threads,
                                           rpc_timeout=timeout_s)
    rpc.init_rpc(name(rank), rank=rank, world_size=world, rpc_backend_options=opts)


def stop() -> None:
    """Leave without the all-process barrier of a graceful shutdown: a dead worker
    would make that barrier wait forever. The coordinator has already ended the run."""
    rpc.shutdown(graceful=False)


def call(rank: int, fn, *args, timeout: float = -1):
    """Blocking call of the module-level function `fn` on `rank` (timeout 0 = none)."""
    return rpc.rpc_sync(name(rank), fn, args=args, timeout=timeout)  # -1: the default


def call_async(rank: int, fn, *args, timeout: float = -1):
    """Non-blocking call; returns a torch.futures.Future of the result."""
    return rpc.rpc_async(name(rank), fn, args=args, timeout=timeout)
