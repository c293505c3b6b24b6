"""The coordinator (on server rank 0): decides which update is next and applies it.

Workers report each push (after its gradients reached every server); the coordinator
keeps the clocks (Ho et al. 2013, "More effective distributed ML via a stale synchronous
parallel parameter server") and one applier thread turns complete updates into
optimizer steps on every shard, one update at a time:

- sync / ssp: update c holds clock c of every live worker, weighted by target tokens
  (or equally) — the gradient of one big batch. It is applied after update c-1. A worker
  may start clock c once version >= c - s (s = ps_staleness; sync: s = 0), i.e. it runs
  at most s clocks ahead of the slowest, and every gradient it computes is applied with
  staleness (version at apply - version computed on) <= s. With s = 0 this is exactly
  synchronous training.
- async (Downpour, Dean et al. 2012): every push is its own update, applied in arrival
  order, normalised by its own token count; no worker waits for another. A worker's
  pull does wait until its own earlier pushes are applied (read-your-writes): the applier
  runs behind the pushes (it also evaluates and checkpoints between two updates), and
  without that wait a worker would go on pulling parameters its own gradients are not in
  yet — during a long evaluation it spent the whole sample budget on the initial
  weights. So at most ceil(P/Q) pushes per worker are queued (P = ps_pull_every,
  Q = ps_push_every), and a gradient is stale by at most ceil((P-1)/Q) of its own
  worker's updates plus the updates other workers applied while it was computed (that
  part depends on their relative speed: async has no bound on it; ssp does). The run
  ends after the same number of samples as sync (train.steps x n_workers worker-steps),
  however they are split between workers: a fast worker does more of them than a
  straggler. Pushes that arrive after the budget is full are refused ("stop").

The LR schedule advances once per global batch of samples (one update in sync/ssp;
n_workers worker-steps in async), so the learning rate follows the same curve in
every mode for the same number of samples.

Faults: a live worker that is not waiting on the coordinator and has been silent for
`ps_timeout_s` is dropped: its unapplied gradients are discarded, pending sync/ssp
updates complete with the remaining workers (re-weighted by their tokens), and its next
message is answered "dropped". A bad update (train/faults.py's guard: non-finite loss or
norm, a loss spike) is not applied; after `faults.max_consecutive` of them in a row the
servers roll back to the run's newest checkpoint with the LR times
`faults.rollback_lr_factor`, before any worker pulls again (as the spmd trainer does,
checkpoint/session.py; without a checkpoint the bad updates in a row are counted afresh
and stay skipped). Unlike spmd, the step counter, the schedule and the workers' data
positions go on: a PS run is train.steps clocks of every worker, and a worker's clocks
cannot go back, so the batches since the checkpoint are skipped and the run ends at the
same sample budget.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from scaletrain.checkpoint.decisions import rollback_record
from scaletrain.paramserver import checkpoint as ckpt
from scaletrain.paramserver import server, transport
from scaletrain.train.faults import FaultMonitor


@dataclass
class Contribution:
    version: int  # parameter version the gradient was computed on
    loss_sum: float
    count: int  # target tokens
    steps: int  # worker steps (batches) in this push
    clock: int  # the worker's next clock after this push
    loader: dict  # the worker's loader state after this push


@dataclass
class Update:
    """One applied update, handed to the trainer's `on_update`."""
    version: int  # after the update
    step: int  # global batches applied so far (the schedule's step)
    prev_step: int
    loss: float  # mean loss over the update's target tokens
    grad_norm: float  # before clipping
    lr: float  # the LR this update used
    tokens: int
    staleness: list[int] = field(default_factory=list)
    fault: dict | None = None  # the fault guard skipped it (train/faults.py's event)
    rollback: dict | None = None  # then too many in a row: the rollback's record


class Coordinator:
    def __init__(self, cfg, n_workers: int, state: dict | None = None,
                 on_update: Callable[[Update], None] = lambda u: None,
                 on_event: Callable[[dict], None] = lambda e: None,
                 faults: FaultMonitor | None = None):
        p = cfg.parallel
        self.mode = p.ps_consistency
        self.s = 0 if self.mode == "sync" else p.ps_staleness
        self.steps, self.n_workers, self.n_servers = cfg.train.steps, n_workers, p.ps_servers
        self.weighting, self.timeout = p.ps_weighting, p.ps_timeout_s
        self.clip = cfg.train.grad_clip
        self.on_update, self.on_event = on_update, on_event
        self.cond = threading.Condition()
        self.live = set(range(n_workers))
        self.finished: set[int] = set()
        self.last_seen = {w: time.monotonic() for w in self.live}
        # Workers waiting to pull: (the condition they wait for, their future).
        self.waiting: dict[int, tuple[Callable[[], bool], torch.futures.Future]] = {}
        self.applied_pushes = {w: 0 for w in self.live}  # async: per worker, this session
        self.contribs: dict[str, dict[int, Contribution]] = {}
        self.queue: deque[str] = deque()  # async: keys in arrival order
        st = state or {}
        self.version = int(st.get("version", 0))
        self.next_clock = int(st.get("next_clock", 0))  # sync/ssp: next update's clock
        self.units = int(st.get("units", 0))  # worker-steps applied
        self.step = int(st.get("step", 0))
        self.tokens = int(st.get("tokens", 0))
        self.positions = {int(w): v for w, v in st.get("positions", {}).items()}
        self.hist: dict[int, int] = {int(k): v for k, v in st.get("hist", {}).items()}
        self.budget = self.steps * n_workers  # async: worker-steps of the whole run
        self.accepted = self.units  # async: worker-steps accepted (applied or queued)
        # The spmd trainer's fault guard (faults.skip_nonfinite, spike_*), consulted on
        # every update's loss and global grad norm: a bad update is not applied.
        self.faults = faults
        self.run_dir, self.lr_factor = Path(cfg.run.dir), cfg.faults.rollback_lr_factor
        if faults is not None and "faults" in st:
            faults.load_state_dict(st["faults"])
        # checkpoint.on_signal: the signal that stops the run (set from a handler, so
        # without the lock); the applier then applies nothing more and answers "stop".
        self.stop_signal: int | None = None

    def state_dict(self) -> dict:
        """Counters and worker positions (between two updates: call from on_update)."""
        state = {"version": self.version, "next_clock": self.next_clock,
                 "units": self.units, "step": self.step, "tokens": self.tokens,
                 "positions": dict(self.positions), "hist": dict(self.hist)}
        if self.faults is not None:  # the spike history: a resume decides alike
            state["faults"] = self.faults.state_dict()
        return state

    # -- called by workers (RPC threads) ----------------------------------------------
    def hello(self, w: int) -> tuple[int, dict | None]:
        """Where worker `w` starts: (clock, loader state) of its last applied push."""
        with self.cond:
            self.last_seen[w] = time.monotonic()
            if self.mode == "async":
                return self.positions.get(w, (0, None))
            # sync/ssp: every worker restarts at the next unapplied clock. All workers'
            # loaders walk the same global batch order, so any worker's loader state at
            # that clock is this worker's too.
            for clock, loader in self.positions.values():
                if clock == self.next_clock:
                    return clock, loader
            return self.next_clock, None

    def report(self, w: int, key: str, c: Contribution) -> str:
        """"ok"; "stop" (async: the sample budget is full — this push filled it and is
        used, or came after and is not) or "dropped" (this push is not used)."""
        with self.cond:
            self.last_seen[w] = time.monotonic()
            if w not in self.live:
                refused = "dropped"
            elif self.stop_signal is not None or (self.mode == "async"
                                                  and self.accepted >= self.budget):
                refused = "stop"
            else:
                self.contribs.setdefault(key, {})[w] = c
                if self.mode == "async":
                    self.queue.append(key)
                    self.accepted += c.steps
                self.cond.notify_all()
                full = self.mode == "async" and self.accepted >= self.budget
                return "stop" if full else "ok"
        self._discard_on_servers(key)
        return refused

    def wait_version(self, w: int, target: int) -> torch.futures.Future:
        """sync/ssp: a future that completes with "ok" once version >= target
        ("dropped" if `w` is dropped first)."""
        return self._wait(w, lambda: self.version >= target)

    def wait_own_pushes(self, w: int, pushed: int) -> torch.futures.Future:
        """async: a future that completes with "ok" once `pushed` pushes of worker `w`
        (all it made this session) are applied ("dropped" if `w` is dropped first)."""
        return self._wait(w, lambda: self.applied_pushes[w] >= pushed)

    def _wait(self, w: int, ready: Callable[[], bool]) -> torch.futures.Future:
        fut = torch.futures.Future()
        with self.cond:
            if w not in self.live:
                result = "dropped"
            elif self.stop_signal is not None:
                result = "stop"
            elif ready():
                self.last_seen[w] = time.monotonic()
                result = "ok"
            else:
                self.waiting[w] = (ready, fut)
                return fut
        fut.set_result(result)
        return fut

    def finish(self, w: int) -> None:
        with self.cond:
            self.finished.add(w)
            self.cond.notify_all()

    def request_stop(self, signum: int) -> None:
        """checkpoint.on_signal: stop after the update being applied (called from a
        signal handler on this process, or over RPC by a signalled worker)."""
        if self.stop_signal is None:
            self.stop_signal = signum

    # -- the applier thread -----------------------------------------------------------
    def run(self) -> None:
        """Apply updates until every live worker has finished (or none is left). After
        a stop request: no further update; every pull and push is answered "stop", and
        the run waits for the live workers' goodbyes (or drops them when silent)."""
        while True:
            with self.cond:
                key = self._next_ready()
                while key is None and not self._done():
                    self._release_on_stop()
                    self.cond.wait(timeout=min(0.5, self.timeout / 4))
                    self._drop_silent()
                    key = self._next_ready()
                if key is None:
                    return
                contribs = self.contribs.pop(key)
            self._apply(key, contribs)

    def _release_on_stop(self) -> None:
        """After a stop request, answer the waiting pulls "stop" (lock held)."""
        if self.stop_signal is None:
            return
        self.queue.clear()
        for w, (_, fut) in list(self.waiting.items()):
            del self.waiting[w]
            fut.set_result("stop")

    def _next_ready(self) -> str | None:
        if self.stop_signal is not None:
            return None
        if self.mode == "async":
            while self.queue:
                key = self.queue.popleft()
                if key in self.contribs:
                    return key
            return None
        key = f"c{self.next_clock}"
        got = self.contribs.get(key, {})
        if self.live and self.next_clock < self.steps and self.live <= got.keys():
            return key
        return None

    def _done(self) -> bool:
        return not self.live or (self.live <= self.finished and not self.queue)

    def _apply(self, key: str, contribs: dict[int, Contribution]) -> None:
        total = sum(c.count for c in contribs.values())
        if self.weighting == "tokens":
            scales = {w: 1.0 / total for w in contribs}
        else:
            scales = {w: 1.0 / (len(contribs) * c.count) for w, c in contribs.items()}
        norms = self._on_servers(server.rpc_aggregate, key, scales)
        # Global norm over every shard, as torch.nn.utils.clip_grad_norm_ computes it.
        grad_norm = float(torch.linalg.vector_norm(torch.cat(norms)))
        coef = min(1.0, self.clip / (grad_norm + 1e-6)) if self.clip > 0 else 1.0
        units = sum(c.steps for c in contribs.values())
        if self.mode == "async":
            new_step = (self.units + units) // self.n_workers
        else:
            new_step = self.step + 1
        lr = server.rpc_lr()  # this process is server 0; every shard has the same LR
        loss = sum(c.loss_sum for c in contribs.values()) / max(total, 1)
        fault = self._judge(loss, grad_norm, new_step)
        self._on_servers(server.rpc_apply, key, coef, new_step - self.step, fault is None)
        # Before the version moves on: no worker pulls the parameters rolled back over.
        rollback = self._roll_back_if_due(new_step) if fault is not None else None
        stale = [self.version - c.version for c in contribs.values()]
        with self.cond:
            prev = self.step
            self.version += 1
            self.units += units
            self.step = new_step
            self.tokens += total
            if self.mode != "async":
                self.next_clock += 1
            for w, c in contribs.items():
                self.positions[w] = (c.clock, c.loader)
                self.applied_pushes[w] += 1
            for s in stale:
                self.hist[s] = self.hist.get(s, 0) + 1
            ready = [(w, f) for w, (ok, f) in self.waiting.items() if ok()]
            for w, _ in ready:
                del self.waiting[w]
                self.last_seen[w] = time.monotonic()
            self.cond.notify_all()
        for _, f in ready:
            f.set_result("ok")
        if self.mode == "ssp" or self.mode == "sync":
            # The SSP bound, checked on every applied gradient (a bug here is ours).
            assert max(stale) <= self.s, f"staleness {max(stale)} > bound {self.s}"
        self.on_update(Update(self.version, self.step, prev, loss, grad_norm, lr, total,
                              stale, fault, rollback))

    def _judge(self, loss: float, grad_norm: float, step: int) -> dict | None:
        """The fault guard's verdict on an update (train/faults.py, as the spmd step's
        guard): None to apply it, else the event to log (the servers skip it: the
        parameters and optimizer state stay, the schedule advances, as in spmd)."""
        if self.faults is None:
            return None
        reason = self.faults.classify(loss, grad_norm)
        self.faults.record(loss, grad_norm, reason, step=step)
        return self.faults.pop_event()

    def _roll_back_if_due(self, step: int) -> dict | None:
        """After faults.max_consecutive bad updates in a row (the monitor's verdict, as
        spmd's): every server back to its shard of the newest checkpoint, the LR scaled
        (server.py `roll_back`), the spike history the checkpoint's. The record to log,
        or None when not due."""
        if not self.faults.should_roll_back():
            return None
        path = ckpt.newest(self.run_dir)
        if path is None:  # as train/faults.py's Rollback: count afresh, keep skipping
            self.faults.count_afresh()
            return rollback_record(step, None, self.lr_factor)
        self._on_servers(server.rpc_roll_back, str(path), self.lr_factor)
        saved = ckpt.load(path, "coordinator")["coordinator"]
        self.faults.load_state_dict(saved.get("faults", {}))
        return rollback_record(step, int(saved["step"]), self.lr_factor)

    def _on_servers(self, fn, *args) -> list:
        """fn(*args) on every server: the others over RPC (concurrently), this process's
        shard (server 0) by a direct call meanwhile."""
        futs = [transport.call_async(s, fn, *args) for s in range(1, self.n_servers)]
        return [fn(*args)] + [f.wait() for f in futs]

    # -- faults ------------------------------------------------------------------------
    def _drop_silent(self) -> None:
        now = time.monotonic()
        for w in sorted(self.live - self.finished):
            if w not in self.waiting and now - self.last_seen[w] > self.timeout:
                self._drop(w, f"no message for {now - self.last_seen[w]:.1f} s "
                              f"(parallel.ps_timeout_s={self.timeout:g})")

    def _drop(self, w: int, reason: str) -> None:
        """Remove worker `w` (called with the lock held)."""
        self.live.discard(w)
        lost = [k for k, v in self.contribs.items() if w in v]
        for k in lost:
            if self.mode == "async":  # the budget is done by the others instead
                self.accepted -= self.contribs[k][w].steps
            del self.contribs[k][w]
            if not self.contribs[k]:
                del self.contribs[k]
                threading.Thread(target=self._discard_on_servers, args=(k,),
                                 daemon=True).start()
        self.on_event({"event": "worker_dropped", "worker": w, "reason": reason,
                       "discarded_updates": len(lost), "workers_left": len(self.live)})
        self.cond.notify_all()

    def _discard_on_servers(self, key: str) -> None:
        for s in range(self.n_servers):
            try:
                transport.call_async(s, server.rpc_discard, key)
            except RuntimeError:  # the run is ending; nothing left to free
                pass


# -- RPC entry points (run on rank 0) ---------------------------------------------------
_COORD: Coordinator | None = None


def install(coord: Coordinator) -> None:
    global _COORD
    _COORD = coord


def rpc_hello(w: int):
    return _COORD.hello(w)


def _with_shard0(fut: torch.futures.Future) -> torch.futures.Future:
    """Once `fut` is "ok": ("ok", version, tensors) of shard 0 — the wait and the pull
    of this process's shard in one round trip; ("dropped", -1, []) if dropped."""
    def reply(done):
        status = done.value()
        return (status, *server.rpc_pull()) if status == "ok" else (status, -1, [])
    return fut.then(reply)


@torch.distributed.rpc.functions.async_execution
def rpc_wait_pull(w: int, target: int):
    """sync/ssp: pull shard 0 once version >= target."""
    return _with_shard0(_COORD.wait_version(w, target))


@torch.distributed.rpc.functions.async_execution
def rpc_wait_own_pull(w: int, pushed: int):
    """async: pull shard 0 once worker `w`'s `pushed` pushes are applied."""
    return _with_shard0(_COORD.wait_own_pushes(w, pushed))


def rpc_push_report(w: int, key: str, grads: list[torch.Tensor], c: Contribution) -> str:
    """Push the gradient of shard 0 and report the whole push (the other shards' pushes
    have completed): one round trip to rank 0."""
    server.rpc_push(key, w, grads)
    return _COORD.report(w, key, c)


def rpc_finish(w: int) -> None:
    _COORD.finish(w)


def rpc_request_stop(signum: int) -> None:
    """A worker got SIGTERM/SIGINT (checkpoint.on_signal): stop the run."""
    _COORD.request_stop(signum)
