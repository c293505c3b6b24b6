"""`python -m scaletrain.parallel.launch ARGS`: torchrun (torch.distributed.run) that ends
like one process does: with the ranks' own one-line messages and a documented exit code.

torchrun already does the right thing on a signal: it forwards it to the workers (which
finish the step, save and exit, see train/faults.py and checkpoint.on_signal), waits, and
then raises `SignalException` out of `main()` — which prints a traceback and exits 1. A
scheduler's stop is not a crash: exit 128+signal with no traceback, like a single process.

When a rank fails, each rank has already said why in one line (a ConfigError, or
parallel/init.py's "a collective failed …" after a dead or hung peer) or printed its own
traceback (an internal error); torchrun then logs every rank's exit and raises
`ChildFailedError`, whose report (a traceback plus a table per rank) says nothing more.
Both are left out, and the launcher exits with the code of the first rank that failed
(torchrun's "root cause"): 2 a mistake in the config or data, 1 an internal error or a
lost peer, 128+N a rank ended by signal N (README "Exit codes").
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

# torchrun's per-rank "failed (exitcode: …)" and "Sending process … closing signal" lines.
_FAILURE_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def exit_code(failed: ChildFailedError) -> int:
    """The exit code of the first rank that failed; a signal N as 128+N (as a shell)."""
    _rank, failure = failed.get_first_failure()
    code = int(failure.exitcode)
    return 128 - code if code < 0 else code


def run(argv: list[str]) -> int:
    logging.getLogger(_FAILURE_LOGGER).setLevel(logging.CRITICAL)
    try:
        main(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        return exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
