"""PNG plots of a run from its `metrics.jsonl` (DESIGN.md §3: ``plots/*.png``).

Uses matplotlib's object API (``matplotlib.figure.Figure``) with the Agg canvas rather
than ``pyplot``: no global figure state, no GUI backend selection, nothing left open,
and safe to call from a training process that never meant to touch a display.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from scaletrain.metrics.summary import read_metrics

# One colour per eval split, stable across runs so plots compare at a glance.
_SPLIT_STYLE = {"val": ("tab:orange", "o"), "test": ("tab:green", "s")}


def _last_per_key(records: list[dict], key) -> list[dict]:
    """Keep the last record for each key, sorted by step.

    A resumed run re-logs the steps after its checkpoint; the later lines are the ones
    that belong to the run's final history.
    """
    out = {}
    for r in records:
        out[key(r)] = r
    return sorted(out.values(), key=lambda r: r["step"])


def _series(records: list[dict], field: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a numeric `field`."""
    xs, ys = [], []
    for r in records:
        v = r.get(field)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: PNG output, no GUI
    return fig


def _plot_loss(train: list[dict], evals: list[dict], path: Path) -> bool:
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = False
    xs, ys = _series(train, "loss")
    if xs:
        ax.plot(xs, ys, lw=1.2, color="tab:blue", label="train")
        drawn = True
    for split in sorted({r.get("split", "?") for r in evals}):
        ex, ey = _series([r for r in evals if r.get("split", "?") == split], "loss")
        if ex:
            color, marker = _SPLIT_STYLE.get(split, (None, "^"))
            ax.plot(ex, ey, ls="--", lw=1, marker=marker, ms=4, color=color, label=split)
            drawn = True
    if not drawn:
        return False
    finite = [y for y in ys if math.isfinite(y)]
    # Log scale once the curve spans a decade; otherwise the late, interesting part of
    # training is a flat line at the bottom of the plot.
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def _plot_lr(train: list[dict], path: Path) -> bool:
    xs, ys = _series(train, "lr")
    if not xs:
        return False
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(xs, ys, lw=1.2, color="tab:purple")
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return True


def plot_run(metrics_jsonl_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``loss.png`` (train loss per step, plus val/test eval points) and ``lr.png``
    (learning rate per step) into `out_dir`; return the paths written.

    Returns ``[]`` and writes nothing when the file is missing or has no records with a
    loss / lr (e.g. a run killed before its first log step). matplotlib is imported
    here, not at package import, because it is slow to import and rarely needed.
    """
    path = Path(metrics_jsonl_path)
    if not path.exists():
        return []
    records = read_metrics(path)
    train = _last_per_key([r for r in records if r.get("kind") == "train" and "step" in r],
                          key=lambda r: r["step"])
    evals = _last_per_key([r for r in records if r.get("kind") == "eval" and "step" in r],
                          key=lambda r: (r.get("split"), r["step"]))
    if not train and not evals:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if _plot_loss(train, evals, out / "loss.png"):
        written.append(out / "loss.png")
    if _plot_lr(train, out / "lr.png"):
        written.append(out / "lr.png")
    return written
