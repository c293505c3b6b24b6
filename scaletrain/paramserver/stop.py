"""checkpoint.on_signal in parameter-server mode: SIGTERM/SIGINT stop the run after the
update being applied, with a checkpoint, as the spmd trainer does
(checkpoint/session.py).

A signal reaches any process (torchrun forwards the launcher's to every rank): rank 0
asks its coordinator directly, any other rank over RPC. The coordinator then applies
no further update and answers every pull and push "stop"; the workers say goodbye,
rank 0 writes the checkpoint of the last applied update and exits 128 + N. A second
SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from scaletrain.paramserver import coordinator as coord
from scaletrain.paramserver import transport


def install(on_signal: bool, request_stop: Callable[[int], None]) -> None:
    """SIGTERM/SIGINT call `request_stop(signum)` instead of ending the process."""
    if not on_signal or threading.current_thread() is not threading.main_thread():
        return
    seen: list[int] = []

    def handle(signum, _frame):
        if seen and signum == signal.SIGINT:
            raise KeyboardInterrupt
        seen.append(signum)
        request_stop(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def ask_coordinator(signum: int) -> None:
    """A server or worker's request: over RPC from a thread (not from the handler,
    which interrupts this process's main thread wherever it is)."""
    def call():
        try:
            transport.call(0, coord.rpc_request_stop, signum)
        except RuntimeError:  # rank 0 is gone: the run is over anyway
            pass
    threading.Thread(target=call, daemon=True).start()


def report(signum: int, step: int, checkpoint: str) -> None:
    """Rank 0's line, as checkpoint/session.py prints it."""
    print(f"scaletrain: stopped by {signal.Signals(signum).name} after step {step}; "
          f"checkpoint {checkpoint} saved; run the same command to resume",
          file=sys.stderr, flush=True)
