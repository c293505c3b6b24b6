"""`python -m scaletrain.parallel.launch ARGS`: torchrun (torch.distributed.run) with a
quiet exit on SIGTERM/SIGINT.

torchrun already does the right thing on a signal: it forwards it to the workers (which
finish the step, save and exit, see train/faults.py and checkpoint.on_signal), waits, and
then raises `SignalException` out of `main()` — which prints a traceback and exits 1. A
scheduler's stop is not a crash: exit 128+signal with no traceback, like a single process.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
