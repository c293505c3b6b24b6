"""PS checkpoints: every server's shard (parameters, optimizer and schedule state,
version), the coordinator's counters and worker positions, and the resolved config.

Layout: `run.dir/checkpoints/step-<8 digits>/{server-<r>.pt, coordinator.pt,
config.json}`, written
by rank 0 (it gathers the shards over RPC between two updates, so they are consistent)
into a temporary directory renamed into place: a directory with that name is complete.
Files hold tensors and plain containers only and are read with
`torch.load(weights_only=True)`, which cannot run code from a crafted file. Why not the
DCP manager of scaletrain/checkpoint: it is built on a c10d process group, and PS
processes talk over RPC only. Resume reads the files from a filesystem shared by the
server processes (true on one node; across nodes mount run.dir on every server).

The saved config is what a resume is judged against, as for the DCP checkpoints'
manifest (checkpoint/compat.py): a changed model shape is refused with the list of
differences; changed optimizer/schedule settings are applied from the resumed step on
(server.py, checkpoint/reconfigure.py) and listed on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from scaletrain.checkpoint.compat import check_compatible
from scaletrain.config import to_dict
from scaletrain.errors import CheckpointError

PREFIX = "step-"
CONFIG_FILE = "config.json"  # plain JSON, like the DCP manifest's config


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def save(run_dir: Path, step: int, servers: list[dict], coordinator: dict,
         keep: int, config: dict, best_step: int | None = None) -> Path:
    """Write checkpoint `step`; keep the newest `keep` and the one of `best_step`
    (checkpoint.keep_best; None: off), as checkpoint/manager.py prunes."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for r, state in enumerate(servers):
        torch.save(state, tmp / f"server-{r}.pt")
    torch.save(coordinator, tmp / "coordinator.pt")
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        if best_step is None or old != step_dir(run_dir, best_step):
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete PS checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX)
             and not d.name.endswith(".tmp") and (d / "coordinator.pt").is_file()]
    return sorted(found, key=lambda d: d.name)


def newest(run_dir: Path) -> Path | None:
    """The run's newest complete PS checkpoint (what a rollback restores), or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve(cfg) -> Path | None:
    """The checkpoint to resume from per `checkpoint.resume`, or None to start afresh."""
    run_dir, how = Path(cfg.run.dir), cfg.checkpoint.resume
    if cfg.run.overwrite:
        return None
    if how in ("auto", "none"):
        found = list_checkpoints(run_dir)
        if found and how == "none":
            raise CheckpointError(f"run.dir '{run_dir}' holds checkpoints and "
                                  "checkpoint.resume='none'; set run.overwrite=true or "
                                  "checkpoint.resume='auto'")
        return found[-1] if found else None
    path = Path(how)
    if (path / "coordinator.pt").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"checkpoint.resume='{how}' is not a PS checkpoint or a run "
                              "directory holding one")
    return found[-1]


def load(path: Path, name: str) -> dict:
    """`server-<r>` or `coordinator` of checkpoint `path` (tensors and containers only)."""
    f = Path(path) / f"{name}.pt"
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{f}: not a readable PS checkpoint file ({e})") from None


def saved_config(path: Path) -> dict | None:
    """The resolved config checkpoint `path` was saved under; None for a checkpoint
    written before PS checkpoints carried it (nothing to compare against)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: not a readable PS checkpoint file ({e})") from None


def check_resume(cfg) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start), refused with the
    list of differences (IncompatibleCheckpoint, exit 2) when the config changed what
    the checkpoint's shape depends on. Called by the launcher before any process starts
    and by every server before it loads its shard."""
    path = resolve(cfg)
    saved = saved_config(path) if path is not None else None
    if saved is not None:
        check_compatible(str(path), saved, to_dict(cfg))
    return path
