"""A parameter server: one shard of the parameters, its optimizer state and LR schedule.

Workers `push` gradients (sums over their target tokens, not means) into per-update
buffers; the coordinator (coordinator.py) decides when an update is complete and which
workers' contributions it holds, then calls `aggregate` (weighted sum; returns the
shard's per-tensor norms for global clipping) and `apply` (clip, optimizer step,
schedule step, version + 1) on every server in turn. Only the coordinator's single
applier thread changes parameters, so all shards go through the same sequence of
updates and a checkpoint taken between two updates is consistent.

The module-level functions are the RPC entry points; they act on this process's
`ShardServer` (one per server process).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn as nn

from scaletrain.checkpoint.reconfigure import reapply, settings_of
from scaletrain.config import Config
from scaletrain.errors import CheckpointError
from scaletrain.optim import build_optimizer, build_scheduler
from scaletrain.optim.step_end import finish_step
from scaletrain.paramserver import checkpoint as ckpt
from scaletrain.train.faults import scale_lr


class ShardServer:
    """Holds the parameters named `names` of `model` (a full model built like every
    other process's, so the initial values are bitwise those of a single process)."""

    def __init__(self, cfg: Config, model: nn.Module, names: list[str], rank: int = 0):
        self.names = list(names)
        self.rank = rank  # server index: its file in a checkpoint is server-<rank>.pt
        params = dict(model.named_parameters())
        mine = set(self.names)
        for n, p in params.items():
            if n not in mine:
                p.requires_grad_(False)  # param_groups skips it: no optimizer state
        self.params = [params[n] for n in self.names]
        # The weight-decay groups come from the whole model (embeddings are found by
        # module type), restricted to this shard: the same groups as single-process.
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        # This config's optimizer/schedule settings, written back over a checkpoint's
        # after a load: a resume with new optim.*/schedule.* flags trains at the new
        # schedule from the resumed step (checkpoint/reconfigure.py, issue 13 item 3).
        self.fresh_settings = settings_of(self.optimizer, self.scheduler)
        for n, p in params.items():
            if n not in mine:
                p.data = torch.empty(0, dtype=p.dtype)  # free what another server holds
        self.version = 0  # updates applied to this shard
        self.pending: dict[str, dict[int, list[torch.Tensor]]] = {}  # key -> worker -> grads
        self.agg: dict[str, list[torch.Tensor]] = {}
        self.lock = threading.Lock()

    # -- worker-facing -----------------------------------------------------------------
    def push(self, key: str, worker: int, grads: list[torch.Tensor]) -> int:
        with self.lock:
            self.pending.setdefault(key, {})[worker] = grads
            return self.version

    def pull(self) -> tuple[int, list[torch.Tensor]]:
        """(version, copies of the shard's tensors): copies, since the next update
        changes the parameters in place while the reply may still be in transit."""
        with self.lock:
            return self.version, [p.detach().clone() for p in self.params]

    # -- coordinator-facing ------------------------------------------------------------
    def aggregate(self, key: str, scales: dict[int, float]) -> torch.Tensor:
        """g = Σ_w scales[w]·grad_w over the named workers (others' pushes are discarded);
        returns the per-tensor L2 norms of g (for the global gradient norm)."""
        with self.lock:
            got = self.pending.pop(key, {})
            missing = [w for w in scales if w not in got]
            if missing:  # the coordinator only names workers whose pushes completed
                raise RuntimeError(f"update {key}: no gradient from workers {missing}")
            agg = None
            for w in sorted(scales):
                # Sum first, divide once (like the single-process step, whose loss is
                # divided by the global count): the scales are equal under 'tokens'.
                agg = list(got[w]) if agg is None else torch._foreach_add(agg, got[w])
            if len(set(scales.values())) == 1:
                torch._foreach_mul_(agg, next(iter(scales.values())))
            else:  # 'equal' weighting: each worker's own mean, averaged
                agg = None
                for w in sorted(scales):
                    g = torch._foreach_mul(got[w], scales[w])
                    agg = g if agg is None else torch._foreach_add(agg, g)
            self.agg[key] = agg
            return torch.stack(torch._foreach_norm(agg))

    def apply(self, key: str, clip_coef: float, sched_steps: int,
              accept: bool = True) -> int:
        """Clip by the global coefficient, step the optimizer (unless the coordinator's
        fault guard refused the update: `accept` False), advance the schedule."""
        with self.lock:
            for p, g in zip(self.params, self.agg.pop(key)):
                # A no-op cast (fp16/bf16-pure are refused, config/ps_checks.py): the
                # pushed gradients are in the parameters' dtype, so scaling them after
                # this is bitwise what scaling before it was.
                p.grad = g.to(p.dtype)
            # The global norm was measured by the coordinator over every shard; this
            # shard applies its clip coefficient (no penalty or value clip here:
            # config/ps_checks.py refuses them). The guard is the coordinator's
            # verdict (faults.*), taken on the whole update's loss and norm.
            finish_step(self.optimizer, self.params,
                        clip_norm=lambda params, _max_norm: scale_grads(params, clip_coef),
                        guard=None if accept else lambda _loss, _norm: False)
            for _ in range(sched_steps):
                self.scheduler.step()
            self.version += 1
            return self.version

    def discard(self, key: str) -> None:
        """Drop the buffers of an update that will never be applied."""
        with self.lock:
            self.pending.pop(key, None)
            self.agg.pop(key, None)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        with self.lock:
            return {"names": list(self.names), "version": self.version,
                    "params": {n: p.detach().clone() for n, p in zip(self.names, self.params)},
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with self.lock:
            self._load_params_and_moments(state)
            self.scheduler.load_state_dict(state["scheduler"])
            reapply(self.optimizer, self.scheduler, self.fresh_settings)
            self.version = int(state["version"])

    def _load_params_and_moments(self, state: dict) -> None:
        """The parameters and optimizer state of checkpoint shard `state` (lock held)."""
        if list(state["names"]) != self.names:
            raise CheckpointError("the checkpoint's PS shards do not match this model "
                                  "and parallel.ps_servers")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])

    def roll_back(self, state: dict, lr_factor: float) -> None:
        """faults.max_consecutive bad updates in a row: the parameters and optimizer
        moments of checkpoint shard `state`, the LR scaled by `lr_factor`
        (train/faults.py `scale_lr`, as the spmd rollback). The version and the schedule
        keep counting: PS's run is its budget of worker clocks, which cannot go back
        (coordinator.py), so the LR stays the current step's, times the factor."""
        with self.lock:
            groups = [{k: v for k, v in g.items() if k != "params"}
                      for g in self.optimizer.param_groups]
            self._load_params_and_moments(state)
            for g, settings in zip(self.optimizer.param_groups, groups):
                g.update(settings)  # this step's LR and settings, not the checkpoint's
            scale_lr(self.scheduler, self.optimizer, lr_factor)


def scale_grads(params: list[torch.Tensor], coef: float) -> None:
    """Multiply the gradients by the global clip coefficient (1.0: left unclipped);
    returns no norm, the coordinator measured it."""
    if coef < 1.0:
        torch._foreach_mul_([p.grad for p in params], coef)


# -- RPC entry points (run on the server process) --------------------------------------
_SERVER: ShardServer | None = None
_STOP = threading.Event()


def install(server: ShardServer) -> None:
    global _SERVER
    _SERVER = server


def rpc_push(key: str, worker: int, grads: list[torch.Tensor]) -> int:
    return _SERVER.push(key, worker, grads)


def rpc_pull() -> tuple[int, list[torch.Tensor]]:
    return _SERVER.pull()


def rpc_aggregate(key: str, scales: dict[int, float]) -> torch.Tensor:
    return _SERVER.aggregate(key, scales)


def rpc_apply(key: str, clip_coef: float, sched_steps: int, accept: bool = True) -> int:
    return _SERVER.apply(key, clip_coef, sched_steps, accept)


def rpc_discard(key: str) -> None:
    _SERVER.discard(key)


def rpc_lr() -> float:
    return _SERVER.lr()


def rpc_state_dict() -> dict:
    return _SERVER.state_dict()


def rpc_roll_back(path: str, lr_factor: float) -> None:
    """Roll this server back to its shard of PS checkpoint `path` (ShardServer.roll_back)."""
    _SERVER.roll_back(ckpt.load(Path(path), f"server-{_SERVER.rank}"), lr_factor)


def rpc_stop() -> None:
    """The coordinator ends the run: the server's main thread may leave."""
    _STOP.set()


def wait_for_stop() -> None:
    _STOP.wait()
