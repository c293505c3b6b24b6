"""Plot the learning rate of every schedule example (configs/schedule-*.toml) side by side.

The curves come from the same code the trainer runs (`build_scheduler` over a dummy
optimizer, stepped `train.steps` times), so the picture is the schedule, not a sketch.
`plateau` needs validation losses: it is fed a synthetic loss curve that improves,
stalls, improves a little and stalls again (drawn in grey on a second axis).

    .venv/bin/python scripts/plot_schedules.py [--out docs/schedules.png]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from scaletrain.config import build_config  # noqa: E402
from scaletrain.config.schema import ScheduleConfig  # noqa: E402
from scaletrain.optim.schedules import build_scheduler  # noqa: E402


def synthetic_val_loss(step: int) -> float:
    """Improves until step 300, flat until 550, a slight dip to 650, then flat."""
    if step <= 300:
        return 6.0 - 2.0 * (1 - math.exp(-step / 100))
    if step <= 550:
        return 4.1
    return 4.1 - 0.2 * min(1.0, (step - 550) / 100)


def lr_curve(cfg) -> tuple[list[float], list[tuple[int, float]]]:
    """(LR used by each step 1..T, the (step, loss) pairs fed to plateau)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg)
    lrs, fed = [], []
    for step in range(1, cfg.train.steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if cfg.schedule.name == "plateau" and step % cfg.eval.interval == 0:
            fed.append((step, synthetic_val_loss(step)))
            sched.observe(fed[-1][1])
    return lrs, fed


def describe(cfg) -> str:
    s = cfg.schedule
    extra = {"step": f"step_size={s.step_size}, γ={s.gamma}",
             "multistep": f"milestones={s.milestones}, γ={s.gamma}",
             "exponential": f"γ={s.gamma}" if not s.decay_rate else f"k={s.decay_rate}",
             "inverse_time": f"k={s.decay_rate}",
             "polynomial": f"power={s.power}",
             "cosine": f"restarts {s.restart_steps}×{s.restart_mult}" if s.restart_steps
             else "",
             "wsd": f"decay {s.decay_fraction:.0%}, {s.decay_shape}",
             "onecycle": f"pct_start={s.pct_start}, div={s.div_factor:g}",
             "plateau": f"γ={s.gamma}, patience={s.patience}"}.get(s.name, "")
    return f"{s.name}  (warmup {s.warmup_steps}{', ' + extra if extra else ''})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "schedules.png"))
    args = ap.parse_args()
    names = ScheduleConfig.__dataclass_fields__["name"].metadata["choices"]
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), sharey=True)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        cfg = build_config(str(ROOT / "configs" / f"schedule-{name}.toml"))
        lrs, fed = lr_curve(cfg)
        ax.plot(range(1, len(lrs) + 1), lrs, lw=1.6)
        ax.axhline(cfg.schedule.min_lr, color="0.6", lw=0.8, ls=":")
        ax.set_title(describe(cfg), fontsize=9)
        ax.grid(alpha=0.3)
        if fed:
            ax2 = ax.twinx()
            ax2.plot(*zip(*fed), "o-", color="0.55", ms=3, lw=0.8)
            ax2.set_ylabel("val loss (synthetic)", fontsize=8, color="0.4")
            ax2.tick_params(labelsize=7, colors="0.4")
    for ax in axes[:, 0]:
        ax.set_ylabel("learning rate")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("scaletrain learning-rate schedules (configs/schedule-*.toml; peak 3e-3, "
                 "dotted line: min_lr)", fontsize=11)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
