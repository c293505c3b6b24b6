"""Config rules of parameter-server mode (`parallel.mode = "ps"`), one line per failure.

Called from config/checks.py `check_parallel` before any compute, with the world size
when it is known (the launcher's --nproc, or $WORLD_SIZE on every rank).
"""

from __future__ import annotations

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError


def n_workers(cfg: Config, world: int) -> int:
    """Worker processes of a world of `world` ranks (the ranks after the servers)."""
    return world - cfg.parallel.ps_servers


def check_ps(cfg: Config, world: int | None) -> None:
    p, t, o = cfg.parallel, cfg.train, cfg.optim
    if (p.dp_replicate, p.tp, p.pp) != (1, 1, 1) or p.dp_shard not in (-1, 1):
        raise ConfigError("parallel.mode='ps' replaces data/tensor/pipeline parallelism: "
                          "leave parallel.dp_replicate, dp_shard, tp and pp at their defaults")
    if p.activation_checkpoint != "none":
        raise ConfigError("parallel.activation_checkpoint is not supported with "
                          "parallel.mode='ps'")
    if p.ps_consistency != "async" and (p.ps_push_every, p.ps_pull_every) != (1, 1):
        raise ConfigError(f"parallel.ps_push_every / ps_pull_every apply to "
                          f"ps_consistency='async' only; '{p.ps_consistency}' pushes and "
                          "pulls every step (set both to 1)")
    if cfg.precision.dtype in ("fp16", "bf16-pure"):
        raise ConfigError(f"precision.dtype='{cfg.precision.dtype}' is not supported with "
                          "parallel.mode='ps' (no loss scaler, no fp32 master weights); "
                          "use fp32, bf16 or fp64")
    if cfg.model.weight_norm:
        raise ConfigError("model.weight_norm is not supported with parallel.mode='ps'")
    if o.l1 or o.l2:
        raise ConfigError("optim.l1 / optim.l2 are not supported with parallel.mode='ps'")
    if t.descent != "mini-batch" or t.batch_ramp:
        raise ConfigError("parallel.mode='ps' needs train.descent='mini-batch' and "
                          "train.batch_ramp=0")
    if world is None:
        return
    w = n_workers(cfg, world)
    if w < 1:
        raise ConfigError(f"parallel.ps_servers={p.ps_servers} leaves no worker in a world "
                          f"of {world} processes (need --nproc > ps_servers)")
    if t.batch_size % w:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                          f"{w} PS workers (world {world} - parallel.ps_servers)")
    per = t.batch_size // w
    if t.micro_batch_size and per % t.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must divide the "
                          f"per-worker batch {per}")
    if p.ps_slow_worker >= w:
        raise ConfigError(f"parallel.ps_slow_worker={p.ps_slow_worker} but there are only "
                          f"{w} workers")
