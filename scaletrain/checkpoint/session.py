"""The trainer's side of checkpointing: resume at start, save on interval / signal / end.

Kept out of the training loop so the loop has three one-line hooks (DESIGN.md §1.8):
`resume()` once before the loop, `after_step(step)` after each step (interval save and a
pending SIGTERM/SIGINT), `at_end(step)` after the loop.

Signals: SIGTERM (what schedulers and torchrun send) and SIGINT only set a flag; the
current step finishes, a checkpoint is written, and the process exits with 128 + the
signal number. A second SIGINT interrupts at once. With several ranks the flag is
all-reduced every step, so every rank stops after the same step (DCP's save is
collective).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.checkpoint.compat import IncompatibleCheckpoint, changed_settings
from scaletrain.checkpoint.manager import CheckpointManager, step_dir_name
from scaletrain.train.host_reads import LaggedReads


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


def attach(trainer) -> CheckpointSession:
    """Build the fault monitor and checkpoint manager of a Trainer, and resume.

    Called from `Trainer.__init__` once model, optimizer, scheduler, scaler, loader,
    state and step options exist, and before the metric sinks open metrics.jsonl.
    """
    from scaletrain.train.device_guard import DeviceGuard, device_guard_applies
    from scaletrain.train.faults import FaultMonitor

    cfg = trainer.cfg
    monitor = FaultMonitor(cfg.faults, has_scaler=trainer.scaler is not None,
                           loss_reducer=trainer.dist.sum_reducer)  # data-parallel sum
    trainer.step_opts.guard = monitor.guard
    if trainer.reads.lag and device_guard_applies(trainer.optimizer,
                                                 trainer.scaler is not None):
        # train.host_reads = lagged: decide the skip on the device (train/device_guard.py)
        st = trainer.state

        def count_skip():
            st.skipped_steps += 1

        trainer.step_opts.guard = DeviceGuard(monitor, trainer.optimizer, trainer.reads,
                                              step_of=lambda: st.step + 1,
                                              on_skip=count_skip)
    manager = CheckpointManager(
        trainer.run_dir, cfg, model=trainer.model, optimizer=trainer.optimizer,
        rank=trainer.rt.rank, tied_copies=trainer.parallel.tied_copies,
        stateful={"scheduler": trainer.scheduler, "scaler": trainer.scaler,
                  "loader": trainer.loader, "train_state": trainer.state, "faults": monitor})
    session = CheckpointSession(manager, monitor, is_main=trainer.rt.is_main,
                                on_signal=cfg.checkpoint.on_signal, reads=trainer.reads)
    session.device = trainer.rt.device
    if trainer.rt.is_main:
        manager.metrics_path = trainer.run_dir / "metrics.jsonl"
    session.resume(trainer.run_dir / "metrics.jsonl")
    return session


class CheckpointSession:
    """The checkpoint manager and fault monitor as the training loop sees them."""

    def __init__(self, manager: CheckpointManager, monitor=None, *, is_main: bool,
                 on_signal: bool = True, reads=None):
        self.manager = manager
        # Step values read on the host (train/host_reads.py); lag 0 = at once.
        self.reads = reads or LaggedReads(0, torch.device("cpu"))
        self._stop_agreed = False  # lagged: the all-reduced stop flag, once read
        self.monitor = monitor
        self.is_main = is_main
        self.on_signal = on_signal
        self.device = torch.device("cpu")  # of the all-reduce (NCCL needs the GPU)
        self._signal: int | None = None
        self._old_handlers: dict[int, object] = {}

    # -- start -------------------------------------------------------------------------
    def resume(self, metrics_path: Path) -> int | None:
        """Load the checkpoint `checkpoint.resume` picks; make metrics.jsonl agree."""
        try:
            step = self.manager.maybe_resume()
        except IncompatibleCheckpoint as e:
            if self.is_main:  # the trainer already wrote the new config: put the run's back
                from scaletrain.config.load import dumps_toml
                from scaletrain.train.run_dir import CONFIG_FILE, write_atomic

                write_atomic(metrics_path.parent / CONFIG_FILE, dumps_toml(e.saved))
            raise
        if self.is_main:
            own = step is not None and self.manager.root.resolve() in \
                self.manager.last_loaded.resolve().parents
            nbytes = self.manager.loaded_extra.get("metrics_bytes")
            # Exact: back to what was logged when the checkpoint was saved. Otherwise
            # (another run's checkpoint, an edited file) by step.
            if not (own and nbytes is not None and cut_metrics(metrics_path, nbytes)):
                truncate_metrics(metrics_path, step)
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
    def after_step(self, trainer) -> None:
        """Fault events (log, roll back), interval save, and a pending signal (save, exit)."""
        step = trainer.state.step
        if self.monitor is not None and self._handle_fault(trainer):
            return  # rolled back: the state is the checkpoint's, nothing new to save
        if trainer.cfg.checkpoint.keep_best:
            self.manager.best_step = trainer.state.best_step
        interval = trainer.cfg.checkpoint.interval
        if interval and step % interval == 0:
            self.reads.flush()  # the saved state (tokens, fault history) up to this step
            if self.monitor is not None and self._handle_fault(trainer):
                return  # this step's fault, read just now, rolled the run back
        saved = self.manager.maybe_save(step)
        if self._stop_requested():
            if not saved:
                self.reads.flush()
                self.manager.save(step)
            self.manager.close()
            name = signal.Signals(self._signal).name if self._signal else "a signal"
            if self.is_main:
                print(f"scaletrain: stopped by {name} after step {step}; checkpoint "
                      f"{step_dir_name(step)} saved; run the same command to resume",
                      file=sys.stderr, flush=True)
            self.restore_signal_handlers()
            if trainer.sinks is not None:
                trainer.sinks.close()
            raise SystemExit(128 + (self._signal or 0))

    def _handle_fault(self, trainer) -> bool:
        """Log the last step's fault, if any; roll back if too many in a row. True if
        the run was rolled back."""
        from scaletrain.train.faults import roll_back

        event = self.monitor.pop_event()
        if event is None:
            return False
        st = trainer.state
        trainer.log({"kind": "fault", "step": st.step, **event})
        if not self.monitor.should_roll_back():
            return False
        self.reads.flush()  # values of steps after the checkpoint: read, then restored over
        skipped, at = st.skipped_steps, st.step
        lr_factor = trainer.cfg.faults.rollback_lr_factor
        to = roll_back(self.manager, trainer.loader, trainer.scheduler, trainer.optimizer,
                       lr_factor)
        if to is None:  # nothing to go back to: keep skipping bad steps
            trainer.log({"kind": "fault", "step": st.step, "event": "rollback_impossible",
                         "reason": "no valid checkpoint"})
            self.monitor.consecutive = 0
            return False
        self.monitor.last_event = None  # a flushed later step's: rolled back over
        trainer.log({"kind": "fault", "step": at, "event": "rollback", "to_step": to,
                     "lr_factor": lr_factor})
        st.skipped_steps = skipped  # the count survives the rollback
        return True

    def at_end(self, trainer) -> None:
        """Save the final state (unless this step was just saved) and wait for it."""
        step = trainer.state.step
        self.reads.flush()
        if trainer.cfg.checkpoint.keep_best:
            self.manager.best_step = trainer.state.best_step
        if self.manager.last_requested_step != step:
            self.manager.save(step)
        self.manager.close()
        self.restore_signal_handlers()
