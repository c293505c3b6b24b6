"""Writing weight files: atomically, with the umask's mode, a full disk as one line.

safetensors' `save_file` creates its file with mode 0600 whatever the umask, so weights
were the only run files others could not read (issue 13 item 23); the finished file gets
the mode `open()` would have given it (0666 & ~umask). A write that fails for a reason of
the machine's (a full disk, a quota, a read-only mount) is a `CheckpointError` (exit 2,
one line) and leaves the previous file of that name untouched (item 12). Libraries hide
the errno in their own error types, so `is_write_failure` recognises them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from scaletrain.errors import CheckpointError

# torch's zip writer (torch.save, hence DCP's FileSystemWriter) reports a short or failed
# write as RuntimeError("[enforce fail at inline_container.cc:…] … unexpected pos …" or
# "PytorchStreamWriter failed writing file …"), without the errno.
_TORCH_WRITE_MARKERS = ("inline_container.cc", "PytorchStreamWriter")
# safetensors' Rust writer: SafetensorError("Error while serializing: I/O error: …").
_SAFETENSORS_IO_MARKER = "I/O error"
_NEARLY_FULL = 1 << 20  # bytes free below which a short write is taken as a full disk


def umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic read-and-restore
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from `open()`: 0666 & ~umask (0644 under umask 022)."""
    return 0o666 & ~umask()


def is_write_failure(e: BaseException) -> bool:
    """True if `e` is a failed write to the file system (not a bug of ours)."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, SafetensorError):
        return _SAFETENSORS_IO_MARKER in str(e)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_MARKERS)


def write_failure_reason(e: BaseException, where: Path) -> str:
    """A short reason for a failed write, with the free space left where it was."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    elif isinstance(e, SafetensorError):
        reason = str(e).split(_SAFETENSORS_IO_MARKER + ":", 1)[-1].strip()
    elif free is not None and free < _NEARLY_FULL:  # torch's writer dropped the errno
        reason = "No space left on device (the write stopped short)"
    else:
        reason = "the write stopped short"
    return reason if free is None else f"{reason}; {free / 2**20:.1f} MiB free on its file system"


def save_safetensors(state: dict[str, torch.Tensor], path: Path,
                     metadata: dict[str, str] | None = None) -> None:
    """`save_file` into `path` atomically (a .tmp renamed into place), mode from the
    umask; a failed write is a CheckpointError and the old `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        reason = write_failure_reason(e, path)
        tmp.unlink(missing_ok=True)  # free the space; the previous file is untouched
        if not is_write_failure(e):
            raise
        raise CheckpointError(f"writing {path} failed: {reason}"
                              + ("; the previous file is untouched" if path.exists() else "")
                              ) from None
