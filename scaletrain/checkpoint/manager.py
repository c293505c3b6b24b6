"""The checkpoint manager: atomic, verified, optionally asynchronous DCP checkpoints.

Layout of `run_dir/checkpoints/step-<8 digits>/`:

    .metadata, __<rank>_0.distcp   model + optimizer, by torch.distributed.checkpoint (DCP)
    extra-rank<R>.json             scheduler, grad scaler, loader position, train state,
                                   fault-detector history, RNG streams of rank R
    manifest.json                  size + SHA-256 of every file, format version, step,
                                   world size, resolved config (written last)

Model and optimizer go through `get_state_dict/set_state_dict`
(torch.distributed.checkpoint.state_dict), which give fully-qualified-name keyed state
for a plain module, DDP or FSDP2 (`fully_shard`) alike, so the same code saves sharded
state (each rank writes its shards) and loads it into another layout (DCP reshards).
Without a process group DCP runs in one process (`no_dist`).

Atomicity: everything is written into `step-XXXXXXXX.tmp/`, the manifest last, and the
directory is renamed into place only when complete; a save killed at any moment leaves
at most a `.tmp` directory (removed by the next save) and every earlier checkpoint
untouched. On load the manifest is verified (every file present, right size, right
digest) before any file is parsed; a checkpoint that fails is reported and skipped.

Async (`checkpoint.async_save`): DCP's `async_save` copies the state to CPU memory (the
only time the step is blocked) and writes it from a thread; with a process group it
uses its own gloo group (sharing the default group with the training collectives
corrupts them on CPU, DESIGN.md §4). At most one save is in flight: the next save, a
load and the end of training wait for it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from scaletrain.config import to_dict
from scaletrain.parallel.checkpoint_layout import (restore_layout, savable, tied_load_names,
                                                    tied_own_names)

from scaletrain.checkpoint import manifest as mf
from scaletrain.checkpoint.compat import check_compatible
from scaletrain.checkpoint.files import is_write_failure, write_failure_reason
from scaletrain.checkpoint.reconfigure import reapply, settings_of
from scaletrain.checkpoint.rng import get_rng_state, set_rng_state
from scaletrain.checkpoint.safe_load import (SafeFileSystemReader, SafeLoadPlanner,
                                              safe_unpickle_metadata)
from scaletrain.errors import CheckpointError, ConfigError, UserError

# DCP warns on every save/load without a process group that it assumes one process; that
# is the intent here (and the warning would come from the background writer thread too).
warnings.filterwarnings("ignore", category=UserWarning,
                        message=r"torch\.distributed is (disabled|unavailable).*single process")
_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split(".")[:2])
CKPT_DIR = "checkpoints"
PREFIX = "step-"
TMP_SUFFIX = ".tmp"


def _state_dict_options(model):
    """Optimizer state saved flattened per parameter ("state.<fqn>.exp_avg",
    "param_groups.<fqn>.lr"), as torchtitan does: a pipeline stage (parallel.pp > 1)
    holds only its own parameters' optimizer, so each stage writes only its entries, and
    every layout — one process included — reads the same keys back (issue #6)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    del model
    return StateDictOptions(flatten_optimizer_state_dict=True)


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every completed (renamed) checkpoint under `root`, oldest first."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            name = p.name
            if p.is_dir() and name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
                out.append((int(name[len(PREFIX):]), p))
    return sorted(out)


def root_cause(e: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's `CheckpointException` wrapper."""
    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))
        return inner[0] if isinstance(inner, tuple) else inner
    return e


def warn(msg: str) -> None:
    print(f"scaletrain: warning: {msg}", file=sys.stderr, flush=True)


class CheckpointManager:
    """Saves and restores everything that changes during training (DESIGN.md §1.6).

    `stateful` maps a name to any object with `state_dict()` / `load_state_dict()` whose
    state is small and JSON-able (scheduler, scaler, loader, train state, fault monitor);
    `None` values are skipped. Model and optimizer go through DCP.
    """

    def __init__(self, run_dir: str | Path, cfg, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, stateful: dict[str, Any],
                 rank: int = 0, config_dict: dict | None = None,
                 tied_copies: dict[str, str] | None = None,
                 metrics_path: Path | None = None):
        self.cfg = cfg
        self.c = cfg.checkpoint
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CKPT_DIR
        self.model, self.optimizer = model, optimizer
        # {tied copy: weight it copies} on this rank (ParallelModel.tied_copies): a
        # pipeline's last-stage head reads the embedding's optimizer entries on load.
        self.tied_copies = dict(tied_copies or {})
        self.stateful = {k: v for k, v in stateful.items() if v is not None}
        # The optimizer/schedule settings of the current config, written back over a
        # checkpoint's after every load (checkpoint/reconfigure.py).
        self.fresh_settings = settings_of(optimizer, self.stateful.get("scheduler"))
        self.rank = rank
        self.config_dict = config_dict if config_dict is not None else to_dict(cfg)
        self.last_saved_step: int | None = None  # newest checkpoint known complete
        self.last_requested_step: int | None = None  # newest save started (maybe in flight)
        # Rank 0's metrics.jsonl (None elsewhere): its size is saved (exact resume).
        self.metrics_path = metrics_path
        self.loaded_extra: dict = {}  # the extra state of the checkpoint last loaded
        self.last_loaded: Path | None = None
        self.loaded_config: dict = {}  # the resolved config the loaded checkpoint saved
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._async_pg = None
        self._stager: DefaultStager | None = None

    # -- saving ------------------------------------------------------------------------
    def _app_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer,
                                            options=_state_dict_options(self.model))
        # TP's strided (fused QKV) shards as plain shards DCP can describe.
        return savable({"app": {"model": model_sd, "optim": optim_sd}})

    def _extra_state(self) -> dict:
        extra = {"rank": self.rank, "rng": get_rng_state(),
                 **{k: v.state_dict() for k, v in self.stateful.items()}}
        if self.metrics_path is not None and self.metrics_path.is_file():
            # Records logged up to this save (JSONL lines are flushed as written); a resume
            # cuts the file back to exactly this, so nothing logged later is duplicated.
            extra["metrics_bytes"] = self.metrics_path.stat().st_size
        return extra

    def maybe_save(self, step: int, *, best_step: int | None = None) -> bool:
        """Save if `step` is a multiple of `checkpoint.interval` (`best_step`: as `save`)."""
        if self.c.interval and step % self.c.interval == 0:
            self.save(step, best_step=best_step)
            return True
        return False

    def save(self, step: int, *, best_step: int | None = None) -> Path:
        """Checkpoint the current state as `step` (sync, or staged + background write).
        `best_step`: with `checkpoint.keep_best`, the checkpoint pruning keeps besides
        the newest `checkpoint.keep` (the best validation loss so far)."""
        self.wait()  # at most one save in flight
        self.last_requested_step = step
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
            tmp.mkdir()
        _barrier()
        try:
            self._write_json(tmp / f"extra-rank{self.rank}.json", self._extra_state())
            state = self._app_state()
            if self.c.async_save:
                fut = dcp.async_save(state, storage_writer=FileSystemWriter(tmp),
                                     process_group=self._gloo_group(),
                                     async_stager=self._get_stager())
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, "ckpt-finalize")
                self._pending = self._executor.submit(self._finish, fut, tmp, final, step,
                                                      best_step)
            else:
                dcp.save(state, storage_writer=FileSystemWriter(tmp))
                _barrier()
                self._finish(None, tmp, final, step, best_step)
                _barrier()
        except (OSError, RuntimeError, CheckpointException) as e:
            self._pending = None
            error = self._save_error(final, e)  # before the removal: the free space then
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # free the space; earlier ones stay
            raise error from None
        return final

    def _get_stager(self) -> DefaultStager:
        """One stager for the whole run: its CPU buffers (pinned when the model is on a
        GPU, so the device-to-host copy runs at full bandwidth) are allocated at the
        first save and reused by every later one. Reuse is safe because at most one
        save is in flight: the previous write has finished before the buffers are
        overwritten. (torch < 2.13's async_save closes a caller's stager after each save,
        which empties it; there a fresh one per save is the only working choice.)"""
        if _TORCH_VERSION < (2, 13):
            on_gpu = any(p.is_cuda for p in self.model.parameters())
            return DefaultStager(StagingOptions(on_gpu, False, False, False))
        if self._stager is None:
            on_gpu = any(p.is_cuda for p in self.model.parameters())
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=False,
                use_non_blocking_copy=False))
        return self._stager

    def _gloo_group(self):
        """A gloo group of its own for the background write (None without a group)."""
        if not _distributed():
            return None
        if self._async_pg is None:
            self._async_pg = dist.new_group(backend="gloo")
        return self._async_pg

    def _finish(self, fut: Future | None, tmp: Path, final: Path, step: int,
                best_step: int | None) -> None:
        """Wait for the data, then (rank 0) manifest, rename into place, prune."""
        if fut is not None:
            try:
                fut.result()
            except BaseException:
                if self.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)  # a failed background write
                raise
        if self.rank != 0:
            return
        mf.write_manifest(tmp, step=step, config=self.config_dict,
                          world_size=dist.get_world_size() if _distributed() else 1)
        if final.exists():  # re-saving a step (e.g. the end of a resumed, finished run)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        self.last_saved_step = step
        self._prune(best_step)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise its error."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except (OSError, RuntimeError, CheckpointException) as e:
            raise self._save_error(self.root, e) from None

    def _save_error(self, where: Path, e: BaseException) -> BaseException:
        """A full disk (any failed write: an OSError, or torch's zip writer's RuntimeError
        that drops the errno) becomes one line; anything else stays internal."""
        cause = root_cause(e)
        if not is_write_failure(cause):
            return cause if isinstance(cause, Exception) else RuntimeError(str(e))
        last = self.last_saved_step
        keep = (f"; the last good checkpoint ({step_dir_name(last)}) is untouched"
                if last is not None else "")
        return CheckpointError(f"saving checkpoint {where} failed: "
                               f"{write_failure_reason(cause, where)}{keep}")

    def _prune(self, best_step: int | None) -> None:
        ckpts = list_checkpoints(self.root)
        keep = {s for s, _ in ckpts[-self.c.keep:]}
        if self.c.keep_best and best_step is not None:
            keep.add(best_step)
        for s, p in ckpts:
            if s not in keep:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def _write_json(path: Path, obj: dict) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())

    # -- choosing what to resume from -------------------------------------------------
    def _on_rank0(self, fn):
        """Run `fn` on rank 0 only (listing + hashing is I/O), share its result or its
        CheckpointError with every rank, so all ranks load the same checkpoint."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except UserError as e:
                box[0] = ("error", type(e).__name__, str(e))
        if _distributed():
            dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise (ConfigError if box[0][1] == "ConfigError" else CheckpointError)(box[0][2])
        return box[0][1]

    def find_resume_target(self) -> tuple[Path, dict] | None:
        """The checkpoint `checkpoint.resume` names, verified; None to start afresh.

        'auto': the newest valid checkpoint of this run; invalid ones are reported and
        skipped; if there are checkpoints but none is valid, CheckpointError.
        A path: that checkpoint (or the newest valid one of that run directory).
        """
        return self._on_rank0(self._find_resume_target)

    def newest_valid(self) -> tuple[Path, dict] | None:
        """The newest valid checkpoint of this run (None if there is none)."""
        return self._on_rank0(lambda: self._newest_valid(self.root, required=False))

    def _find_resume_target(self) -> tuple[Path, dict] | None:
        how = self.c.resume
        if how == "none":
            if list_checkpoints(self.root) and not self.cfg.run.overwrite:
                raise ConfigError(f"checkpoint.resume='none' but run.dir '{self.run_dir}' "
                                  "holds checkpoints; set run.overwrite=true to start afresh")
            return None
        if how == "auto":
            return self._newest_valid(self.root, required=False)
        path = Path(how)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume: '{path}' is not a directory")
        if (path / mf.MANIFEST).is_file():
            return path, mf.verify(path)
        if (path / CKPT_DIR).is_dir():
            return self._newest_valid(path / CKPT_DIR, required=True)
        if list_checkpoints(path):
            return self._newest_valid(path, required=True)
        raise CheckpointError(f"checkpoint.resume: '{path}' is not a scaletrain checkpoint "
                              f"(no {mf.MANIFEST}) nor a run directory with checkpoints")

    @staticmethod
    def _newest_valid(root: Path, required: bool) -> tuple[Path, dict] | None:
        ckpts = list_checkpoints(root)
        if not ckpts:
            if required:
                raise CheckpointError(f"'{root}' holds no checkpoints")
            return None
        errors = []
        for _, path in reversed(ckpts):
            try:
                m = mf.verify(path)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            for err in errors:  # reported only when falling back (else: one error line)
                warn(f"skipping invalid checkpoint: {err}")
            return path, m
        raise CheckpointError(f"no valid checkpoint in '{root}' ({len(ckpts)} found, all "
                              f"invalid; newest: {errors[0]})")

    # -- loading -----------------------------------------------------------------------
    def load(self, path: Path, manifest: dict | None = None) -> dict:
        """Restore every piece of state from a checkpoint (verified first); its manifest."""
        self.wait()
        m = manifest if manifest is not None else self._on_rank0(lambda: mf.verify(path))
        check_compatible(str(path), m.get("config", {}), self.config_dict)
        try:  # refuse a disallowed pickle here (DCP would bury it in its own error)
            safe_unpickle_metadata((path / ".metadata").read_bytes())
        except (pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be loaded safely ({e})") from None
        state = self._app_state()  # fqn-keyed, in this process's layout (DCP reshards)
        # A pipeline's tied head copy reads the embedding's optimizer entries (any layout).
        aliases = self.tied_copies
        state = tied_load_names(state, aliases)
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
        except (CheckpointException, pickle.UnpicklingError, OSError) as e:
            cause = root_cause(e)
            if isinstance(cause, (pickle.UnpicklingError, OSError, EOFError)):
                raise CheckpointError(f"{path}: cannot be loaded safely ({cause})") from None
            raise cause if isinstance(cause, Exception) else RuntimeError(str(e)) from None
        state = tied_own_names(state, aliases)
        set_state_dict(self.model, self.optimizer,
                       model_state_dict=state["app"]["model"],
                       optim_state_dict=state["app"]["optim"],
                       options=_state_dict_options(self.model))
        restore_layout(self.optimizer)  # optimizer state back onto TP's strided shards
        extra = self.loaded_extra = self._read_extra(path, m)
        for name, obj in self.stateful.items():
            if name in extra:
                obj.load_state_dict(extra[name])
        set_rng_state(extra["rng"])
        reapply(self.optimizer, self.stateful.get("scheduler"), self.fresh_settings)
        self.loaded_config = m.get("config", {})
        self.last_saved_step = self.last_requested_step = m["step"]
        self.last_loaded = path
        return m

    def _read_extra(self, path: Path, m: dict) -> dict:
        # A different world size has no file for this rank: take rank 0's (the loader
        # position and counters are world-size independent; RNG streams then differ).
        name = f"extra-rank{self.rank}.json"
        if name not in m["files"]:
            name = "extra-rank0.json"
        try:
            return json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / name}: unreadable ({e})") from None

    def maybe_resume(self) -> int | None:
        """Resume per `checkpoint.resume`; the step resumed from, or None (fresh start)."""
        target = self.find_resume_target()
        if target is None:
            return None
        path, m = target
        self.load(path, m)
        return m["step"]

    def close(self) -> None:
        """Wait for the save in flight and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
