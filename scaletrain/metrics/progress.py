"""A training progress bar: step, loss, lr, tokens/s and ETA, drawn by tqdm.

tqdm already does rate smoothing, ETA, terminal-width handling and "print a line without
breaking the bar" (`tqdm.write`); this wrapper only maps training quantities onto it and
decides when to show it (DESIGN.md §1.11).
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from tqdm import tqdm  # not tqdm.auto: no notebook widget dependency

Enabled = Literal["auto", "on", "off"]

# Short labels keep the postfix narrow enough for an 80-column terminal.
_LABELS = {"tokens_per_s": "tok/s", "grad_norm": "gnorm"}


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key == "lr":
        return f"{value:.2e}"  # learning rates span decades; fixed-point hides warmup
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


class Progress:
    """Progress over optimizer steps.

    Args:
        total_steps: the step the run ends at (``train.steps``).
        initial: the step already reached (non-zero on resume, so the ETA is right).
        enabled: ``"on"`` always draws; ``"off"`` never does; ``"auto"`` draws only
            when stderr is a terminal (tqdm's ``disable=None``), so log files and CI
            output are not filled with carriage-return frames.

    The bar is written to stderr; :meth:`write` messages go to stdout and are printed
    even when the bar is off (they are real output, e.g. eval lines).
    Create it on rank 0 only.
    """

    def __init__(self, total_steps: int, initial: int = 0, enabled: Enabled = "auto"):
        if enabled not in ("auto", "on", "off"):
            raise ValueError(f"enabled must be 'auto', 'on' or 'off', got {enabled!r}")
        disable = {"auto": None, "on": False, "off": True}[enabled]
        self._bar = tqdm(
            total=total_steps,
            initial=initial,
            disable=disable,
            file=sys.stderr,  # looked up now, not at import, so redirection is honoured
            unit="step",
            dynamic_ncols=True,
            # The default format already shows step/total, elapsed<ETA, steps/s, postfix.
        )
        self._step = initial

    @property
    def enabled(self) -> bool:
        """Whether the bar is actually drawn."""
        return not self._bar.disable

    def update(self, step: int, **postfix: Any) -> None:
        """Move the bar to `step` (absolute) and show `postfix` (e.g. loss=, lr=,
        tokens_per_s=). Values are formatted compactly; keys keep their order."""
        if postfix:
            shown = {_LABELS.get(k, k): _fmt(k, v) for k, v in postfix.items()}
            # refresh=False: the update() below redraws once instead of twice.
            self._bar.set_postfix(shown, refresh=False)
        if step != self._step:
            self._bar.update(step - self._step)
            self._step = step

    def write(self, msg: str) -> None:
        """Print a line to stdout without breaking the bar."""
        tqdm.write(msg, file=sys.stdout)

    def close(self) -> None:
        """Finish the bar (leaves the last frame on screen)."""
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
