"""A resumed run trains with the *current* config's optimizer and schedule settings.

A checkpoint restores the optimizer's param groups (lr, initial_lr, weight decay, betas,
...) and the scheduler's state (base_lrs; for `plateau` also torch's ReduceLROnPlateau
settings) as they were saved. Left alone, a resume under changed `optim.*` /
`schedule.*` flags would run the *old* peak LR under the *new* schedule (issue 13 item 3:
config.toml said lr=1e-4 while metrics.jsonl showed 1e-3 × the new multiplier). So after
every load the settings the current config built are written back over the restored
ones, and the LR of the next step is recomputed from the current schedule's closed form
at the restored step: what config.toml says is what runs, from the resumed step on.

What a checkpoint legitimately carries is kept: the step count (the schedule position),
the plateau counters and the LR reductions made so far, and a fault rollback's
`rollback_lr_factor` (kept as the ratio base_lr / initial_lr, applied to the new peak).
When nothing differs nothing is touched, so an unchanged resume stays bitwise exact.
"""

from __future__ import annotations

# Param-group keys that are state, not settings: the parameters themselves, the LR of
# the next step (recomputed below) and the peak it scales (rebased below).
_NOT_SETTINGS = ("params", "lr", "initial_lr")
# torch ReduceLROnPlateau attributes that come from schedule.* (optim/schedules.py).
_PLATEAU_SETTINGS = ("factor", "patience", "threshold", "threshold_mode", "cooldown",
                     "min_lrs", "eps", "mode")


def settings_of(optimizer, scheduler) -> dict:
    """The optimizer/scheduler settings as the current config built them (before any
    checkpoint is loaded): per param group every setting and the peak LR."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    plateau = getattr(scheduler, "plateau", None)
    return {"groups": groups,
            "plateau": {k: _copy(getattr(plateau, k)) for k in _PLATEAU_SETTINGS
                        if hasattr(plateau, k)} if plateau is not None else None}


def _copy(v):
    return list(v) if isinstance(v, list) else v


def _same(a, b) -> bool:
    """Equal settings; a checkpoint gives tuples (betas) back as lists."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def reapply(optimizer, scheduler, fresh: dict) -> bool:
    """Write the current config's settings (`fresh`, from `settings_of`) over what a
    checkpoint restored and set the next step's LR from the current schedule; True if
    anything changed."""
    changed = False
    base_lrs = getattr(scheduler, "base_lrs", None)
    for i, (g, want) in enumerate(zip(optimizer.param_groups, fresh["groups"])):
        for k, v in want.items():
            if k not in _NOT_SETTINGS and not _same(g.get(k), v):
                g[k], changed = v, True
        peak = want.get("initial_lr", want["lr"])
        if base_lrs is not None and g.get("initial_lr") != peak:
            # A rollback's factor survives as the ratio to the peak it scaled.
            factor = base_lrs[i] / g["initial_lr"] if g.get("initial_lr") else 1.0
            old_base, base_lrs[i] = base_lrs[i], peak * factor
            g["initial_lr"], changed = peak, True
            if getattr(scheduler, "plateau", None) is not None and old_base:
                g["lr"] = g["lr"] * (base_lrs[i] / old_base)  # reductions so far kept
    plateau = getattr(scheduler, "plateau", None)
    if plateau is not None and fresh["plateau"]:
        for k, v in fresh["plateau"].items():
            if not _same(getattr(plateau, k), v):
                setattr(plateau, k, _copy(v))
                changed = True
    return _set_next_lr(optimizer, scheduler) or changed


def _set_next_lr(optimizer, scheduler) -> bool:
    """The LR of the next step from the schedule at the restored step; True if it moved."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:  # ClosedFormLR: exactly what LambdaLR.get_lr computes
        lrs = [base * lmbda(scheduler.last_epoch)
               for lmbda, base in zip(lambdas, scheduler.base_lrs)]
    elif getattr(scheduler, "plateau", None) is not None:  # PlateauLR
        if scheduler.last_epoch <= scheduler.warmup:
            before = [g["lr"] for g in optimizer.param_groups]
            scheduler._set_warmup_lr()
            return before != [g["lr"] for g in optimizer.param_groups]
        floors = scheduler.plateau.min_lrs
        lrs = [max(g["lr"], floor) for g, floor in zip(optimizer.param_groups, floors)]
    else:
        return False
    moved = False
    for g, lr in zip(optimizer.param_groups, lrs):
        if g["lr"] != lr:
            g["lr"], moved = lr, True
    if lambdas is not None:
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return moved
