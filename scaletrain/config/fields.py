"""`F`, the declaration of one config field (its documentation and constraints), and shared bounds."""

from __future__ import annotations

from dataclasses import field
from typing import Any


# Bounds shared by several fields. A seed must be a TOML integer (int64) to round-trip
# through config.toml; torch.manual_seed overflows above 2**64-1. Thread counts: libgomp
# segfaults when asked for 100,000 threads (issue 13); 1024 is far above any machine's
# useful intra-op parallelism.
MAX_SEED = 2**63 - 1
MAX_THREADS = 1024


def F(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
      gt: float | None = None, le: float | None = None, lt: float | None = None,
      path: bool = False):
    """A config field with its documentation and the constraints `load.validate` checks.

    `path`: the value names a file or directory (or a glob): a leading `~` is expanded
    to the home directory (config/paths.py), as a shell does outside quotes."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
