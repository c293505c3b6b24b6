"""Run a function in N fresh processes joined by a gloo process group; collect results.

`run_distributed(fn, world, *args)` starts `world` spawned processes with the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT),
calls `fn(rank, world, *args)` in each and returns the per-rank return values in rank
order. A rank that raises fails the call with its traceback; ranks that are still
running after `timeout` seconds are killed and the call fails — a hang costs seconds,
not CI's 90 minutes. `fn` must be importable (defined at module level).

Each process gets one intra-op thread: N processes on this 2-core machine would
otherwise oversubscribe it.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world: int, port: int, results, args, env: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), **env})
    import torch

    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        # Tensors would travel as shared-memory handles that die with this process;
        # serialised bytes do not.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedFailure(AssertionError):
    """A rank raised, exited without a result, or the run exceeded its timeout."""


def run_distributed(fn, world: int, *args, timeout: float = 60.0,
                    env: dict | None = None, expect_exit: dict | None = None) -> list:
    """fn(rank, world, *args) on `world` processes; their results in rank order.

    `expect_exit`: {rank: exit code} of ranks expected to die without a result (fault
    tests); their entry in the returned list is None.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, r, world, port, results, args, dict(env or {})))
             for r in range(world)]
    for p in procs:
        p.start()
    expect_exit = expect_exit or {}
    got: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) + len(errors) < world - len(expect_exit):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world) if r not in got and r not in expect_exit]
                raise DistributedFailure(f"timeout after {timeout:.0f}s; ranks {missing} "
                                         f"gave no result")
            try:
                rank, ok, out = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in got and r not in expect_exit]
                if dead:
                    time.sleep(0.5)  # let a result already in the pipe arrive
                    if results.empty():
                        raise DistributedFailure(
                            f"ranks {dead} exited with codes "
                            f"{[procs[r].exitcode for r in dead]} without a result") from None
                continue
            if ok:
                import torch

                got[rank] = torch.load(io.BytesIO(out), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{out}")
        if errors:
            raise DistributedFailure("\n".join(errors))
        for r, code in expect_exit.items():
            procs[r].join(max(0.0, deadline - time.monotonic()))
            if procs[r].exitcode != code:
                raise DistributedFailure(f"rank {r} exited with {procs[r].exitcode}, "
                                         f"expected {code}")
        return [got.get(r) for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(1.0)
