"""What the checkpoint session tells the training loop after each step.

`CheckpointSession.after_step` returns one of these values; the loop acts on it
(train/trainer.py): `Continue` and `RolledBack` run the next step, `Stop` ends the run,
and the CLI turns its exit code into the process's (cli/train.py). A value, not an exception
or an attribute written on the trainer: the loop reads top to bottom, and a test can
drive the session and look at what it decided (tests/unit/test_checkpoint_session.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Continue:
    """Nothing to do: run the next step."""


@dataclass(frozen=True)
class RolledBack:
    """Too many bad steps in a row: the state is now the checkpoint of `step`'s.

    The loop goes on from there (on new batches: the loader kept its position).
    """

    step: int


@dataclass(frozen=True)
class Stop:
    """A SIGTERM/SIGINT arrived: checkpoint `step` is saved; end with `exit_code`
    (128 + the signal number, as a shell reports a process ended by it)."""

    step: int
    exit_code: int


Decision = Continue | RolledBack | Stop
CONTINUE = Continue()


def rollback_record(step: int, to: int | None, lr_factor: float) -> dict:
    """The metrics.jsonl record of a rollback after `faults.max_consecutive` bad steps at
    `step`: to checkpoint step `to`, or impossible (None: no valid checkpoint yet, the
    run keeps skipping bad steps). Written by the spmd session and the PS coordinator."""
    if to is None:
        return {"kind": "fault", "step": step, "event": "rollback_impossible",
                "reason": "no valid checkpoint"}
    return {"kind": "fault", "step": step, "event": "rollback", "to_step": to,
            "lr_factor": lr_factor}
