"""Config rules of parameter-server mode (`parallel.mode = "ps"`), one line per failure.

Called from config/checks.py `check_parallel` before any compute, with the world size
when it is known (the launcher's --nproc, or $WORLD_SIZE on every rank).
"""

from __future__ import annotations

import dataclasses
import json
import keyword

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError

# Fields the PS path (trainer.py, worker.py, server.py, coordinator.py and the shared
# data/, evaluate/, metrics/, optim/ code they call) does not read: field -> (why,
# values that say what PS does anyway, e.g. a feature's "off"). Adding support for one
# means deleting its row. Not listed: fields refused by check_ps below (layouts,
# precision, ...), and fields that only refine a listed or refused one (compile_scope,
# batch_ramp_start, pp_*, lora_alpha, distill.alpha, ...), which spmd ignores too while
# their parent is off. Honoured through the parts PS shares with the spmd trainer:
# checkpoint.keep_best (PS checkpoint pruning), faults.skip_nonfinite / spike_* (the
# coordinator consults train/faults.py's monitor on every update), faults.max_consecutive
# / rollback_lr_factor (the coordinator rolls the servers back to the newest PS
# checkpoint: paramserver/coordinator.py), checkpoint.on_signal (paramserver/stop.py).
# A field set to its schema default passes (it cannot be told from an unset one), so
# every row's default must be what PS does anyway: its feature's "off" (compile,
# grad_clip_value, loader_workers, async_save, plan.auto, init.from, ...), "auto"
# (host_reads, backend), or a layout setting PS has no use for (timeout_s: PS waits
# ps_timeout_s; reshard_after_forward, ddp_bucket_mb). faults.max_consecutive (8) was
# the one row whose default asked for something PS did not do; PS now does it.
UNSUPPORTED: dict[str, tuple[str, tuple]] = {
    "train.compile": ("the workers run the model eagerly", ()),
    "train.grad_clip_value": ("the servers clip the global norm only (train.grad_clip)",
                              ()),
    "train.host_reads": ("the coordinator reads every push's loss at once",
                         ("every-step",)),
    "data.loader_workers": ("the workers read their batches in the loop", ()),
    # Issue 16: the PS train records would lack tokens_by_source (each worker's sampler
    # counts only its own pushes, and async/dropped pushes make their sum not the
    # applied tokens), so refuse rather than log a record without the mixture's counts.
    "data.mixture": ("its train records carry no tokens_by_source; use the spmd trainer",
                     ()),
    "optim.lr_scaling": ("the servers' optimizers run at optim.lr, unscaled", ()),
    "schedule.name": ("the servers' schedules never see the validation loss", ()),
    "schedule.epoch_steps": ("the servers' schedules do not know the epoch length", ()),
    "checkpoint.async_save": ("PS checkpoints are written synchronously", ()),
    "parallel.backend": ("PS talks over torch RPC (TensorPipe), no collective backend",
                         ()),
    "parallel.timeout_s": ("PS waits parallel.ps_timeout_s instead", ()),
    "parallel.cpu_offload": ("it is an FSDP2 setting; PS servers hold the parameters",
                             ()),
    "parallel.reshard_after_forward": ("it is an FSDP2 setting; PS servers hold the "
                                       "parameters", ()),
    "parallel.ddp_bucket_mb": ("it is a DDP setting; PS workers push whole gradients", ()),
    "plan.auto": ("the plan does not model PS ranks", ()),
    "init.from": ("PS builds its weights from train.seed only", ()),
    "finetune.freeze": ("PS trains every parameter of the model", ()),
    "finetune.lora_rank": ("PS trains every parameter of the model", ()),
    "distill.teacher": ("PS workers compute the plain cross-entropy", ()),
}
# Only these values of a field whose other values PS honours are refused.
REFUSED_ONLY = {"schedule.name": ("plateau",), "schedule.epoch_steps": (0,)}


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
    check_unsupported(cfg)
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


def _value_and_default(cfg: Config, key: str):
    """(value in `cfg`, schema default) of `section.key` (`init.from` is `from_`)."""
    sec_name, name = key.split(".")
    attr = name + "_" if keyword.iskeyword(name) else name
    section = getattr(cfg, sec_name)
    f = next(f for f in dataclasses.fields(section) if f.name == attr)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return getattr(section, attr), default


def check_unsupported(cfg: Config) -> None:
    """ConfigError naming the first UNSUPPORTED field set to a value PS would ignore.

    Compared with the schema default: a field explicitly set to its default cannot be
    told apart from an unset one, and passes."""
    for key, (why, off) in UNSUPPORTED.items():
        value, default = _value_and_default(cfg, key)
        refused = (value in REFUSED_ONLY[key] if key in REFUSED_ONLY
                   else value != default and value not in off)
        if refused:
            raise ConfigError(f"{key}={json.dumps(value)}: parallel.mode='ps' does not "
                              f"support it ({why})")
