"""The trainer's side of checkpointing: resume at start, save on interval / signal / end.

Kept out of the training loop so the loop has three one-line hooks (DESIGN.md §1.8):
`resume()` once before the loop, `after_step(step)` after each step (fault events,
interval save, a pending SIGTERM/SIGINT), `at_end(step)` after the loop.

Like torchtitan's `CheckpointManager(states=...)` the session is handed everything it
uses — the Stateful objects it saves, the fault monitor it consults and the rollback it
calls, paths, this rank's facts, the signal policy — and writes no attribute on any of
them. `after_step` returns a decision (checkpoint/decisions.py) that the loop acts on.

Signals: SIGTERM (what schedulers and torchrun send) and SIGINT only set a flag; the
current step finishes, a checkpoint is written, and `after_step` returns `Stop` with
exit code 128 + the signal number, which the CLI exits with. A second SIGINT interrupts
at once. With several ranks the flag is all-reduced every step, so every rank stops
after the same step (DCP's save is collective).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from scaletrain.checkpoint.compat import IncompatibleCheckpoint, changed_settings
from scaletrain.checkpoint.decisions import (CONTINUE, Decision, RolledBack, Stop,
                                             rollback_record)
from scaletrain.checkpoint.manager import CheckpointManager, step_dir_name
from scaletrain.config.load import dumps_toml
from scaletrain.config.run_files import CONFIG_FILE, write_atomic


def cut_metrics(path: Path, nbytes: int) -> bool:
    """Cut metrics.jsonl back to its first `nbytes` bytes if that ends a line; success."""
    if not path.is_file() or path.stat().st_size < nbytes:
        return False
    with open(path, "r+b") as f:
        if nbytes > 0:
            f.seek(nbytes - 1)
            if f.read(1) != b"\n":
                return False
        f.truncate(nbytes)
    return True


def truncate_metrics(path: Path, through_step: int | None) -> int:
    """Drop metrics.jsonl records with step > `through_step` (all if None); count dropped.

    A resumed run re-logs the steps after its checkpoint; without this the file would
    hold those steps twice. Lines that do not parse (a partial last line) are dropped.
    """
    import json

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            dropped += 1
            continue
        if through_step is not None and isinstance(step, int) and step <= through_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


# The two states DCP saves (sharded, resharded on load); the others are small JSON state.
DCP_STATES = ("model", "optimizer")


class CheckpointSession:
    """The checkpoint manager and fault handling as the training loop sees them.

    states: name -> Stateful to save: "model" and "optimizer" (through DCP) and any
      small ones (scheduler, scaler, loader, train state, fault monitor); None skipped.
    faults: the fault monitor whose events it logs (`pop_event()`) and whose verdict it
      asks (`should_roll_back()`); None: no fault handling.
    rollback: called with the manager when the monitor says so; restores the newest
      valid checkpoint and returns its step (None: there is none); `lr_factor` is logged.
    reads: the run's host reads (train/host_reads.py), flushed before a save or rollback.
    log: writes one metrics record (fault events), before any save that follows, so
      the saved metrics size includes it.
    device: where the stop flag is all-reduced (NCCL needs the GPU).
    """

    def __init__(self, states: dict[str, Any], *, cfg, run_dir: Path, metrics_path: Path,
                 rank: int, is_main: bool, device: torch.device, reads,
                 log: Callable[[dict], None], faults=None, rollback=None,
                 on_signal: bool = True, tied_copies: dict[str, str] | None = None):
        small = {k: v for k, v in states.items() if k not in DCP_STATES}
        self.manager = CheckpointManager(run_dir, cfg, model=states["model"],
                                         optimizer=states["optimizer"], stateful=small,
                                         rank=rank, tied_copies=tied_copies,
                                         # its size at each save makes a resume exact
                                         metrics_path=metrics_path if is_main else None)
        self.checkpoint_cfg = cfg.checkpoint
        self.run_dir, self.metrics_path = Path(run_dir), metrics_path
        self.faults, self.rollback = faults, rollback
        # Step values read on the host (train/host_reads.py); lag 0 = at once.
        self.reads = reads
        self.log = log
        self._stop_agreed = False  # lagged: the all-reduced stop flag, once read
        self.is_main = is_main
        self.on_signal = on_signal
        self.device = device
        self._signal: int | None = None
        self._old_handlers: dict[int, object] = {}

    # -- start -------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load the checkpoint `checkpoint.resume` picks; make metrics.jsonl agree."""
        try:
            step = self.manager.maybe_resume()
        except IncompatibleCheckpoint as e:
            if self.is_main:  # the trainer already wrote the new config: put the run's back
                write_atomic(self.run_dir / CONFIG_FILE, dumps_toml(e.saved))
            raise
        if self.is_main:
            own = step is not None and self.manager.root.resolve() in \
                self.manager.last_loaded.resolve().parents
            nbytes = self.manager.loaded_extra.get("metrics_bytes")
            # Exact: back to what was logged when the checkpoint was saved. Otherwise
            # (another run's checkpoint, an edited file) by step.
            if not (own and nbytes is not None and cut_metrics(self.metrics_path, nbytes)):
                truncate_metrics(self.metrics_path, step)
            if step is not None:
                print(f"scaletrain: resumed from {step_dir_name(step)} "
                      f"({self.manager.root})", file=sys.stderr, flush=True)
                changes = changed_settings(self.manager.loaded_config,
                                           self.manager.config_dict)
                if changes:  # applied from the resumed step on (checkpoint/reconfigure.py)
                    print("scaletrain: resuming with changed settings: "
                          + "; ".join(changes), file=sys.stderr, flush=True)
        return step

    # -- signals -----------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        if not self.on_signal or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._signal = signum

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _stop_requested(self) -> bool:
        flag = self._signal is not None
        if dist.is_available() and dist.is_initialized() and self.on_signal:
            t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank stops after one step
            if not self.reads.lag:
                return bool(t.item())

            def agree(v):
                self._stop_agreed = self._stop_agreed or bool(v[0])

            # Read a later step, at the same step on every rank (host_reads.py).
            self.reads.push(t, agree)
            return self._stop_agreed
        return flag

    # -- per step / end ----------------------------------------------------------------
    def after_step(self, step: int, *, best_step: int) -> Decision:
        """Fault events (log, roll back), interval save, and a pending signal (save,
        stop) after optimizer step `step`; `best_step`: keep_best's, kept when pruning."""
        if self.faults is not None and (to := self._handle_fault(step)) is not None:
            return RolledBack(step=to)  # the state is the checkpoint's, nothing new to save
        interval = self.checkpoint_cfg.interval
        if interval and step % interval == 0:
            self.reads.flush()  # the saved state (tokens, fault history) up to this step
            if self.faults is not None and (to := self._handle_fault(step)) is not None:
                return RolledBack(step=to)  # this step's fault, read just now, rolled back
        saved = self.manager.maybe_save(step, best_step=best_step)
        if not self._stop_requested():
            return CONTINUE
        if not saved:
            self.reads.flush()
            self.manager.save(step, best_step=best_step)
        self.manager.close()
        name = signal.Signals(self._signal).name if self._signal else "a signal"
        if self.is_main:
            print(f"scaletrain: stopped by {name} after step {step}; checkpoint "
                  f"{step_dir_name(step)} saved; run the same command to resume",
                  file=sys.stderr, flush=True)
        self.restore_signal_handlers()
        return Stop(step=step, exit_code=128 + (self._signal or 0))

    def _handle_fault(self, step: int) -> int | None:
        """Log the last step's fault, if any; roll back if too many in a row. The step
        rolled back to, or None (no fault, not yet too many, nothing to go back to)."""
        event = self.faults.pop_event()
        if event is None:
            return None
        self.log({"kind": "fault", "step": step, **event})
        if not self.faults.should_roll_back():
            return None
        self.reads.flush()  # values of steps after the checkpoint: read, then restored over
        to = self.rollback(self.manager)
        # None: nothing to go back to, the rollback keeps skipping bad steps
        self.log(rollback_record(step, to, self.rollback.lr_factor))
        return to

    def at_end(self, step: int, *, best_step: int) -> None:
        """Save the final state (unless this step was just saved) and wait for it."""
        self.reads.flush()
        if self.manager.last_requested_step != step:
            self.manager.save(step, best_step=best_step)
        self.manager.close()
        self.restore_signal_handlers()
