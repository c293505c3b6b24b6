"""A PS worker: pull parameters, compute a gradient on its own data, push it.

Worker i of n reads slice i of every global batch from the world-size-independent
`StatefulLoader` (rank=i, world=n), so the union of the workers' batches at clock c is
exactly the single-process batch of step c+1. It sends the gradient of its *summed*
loss and its target count; the server divides by the total count of the update
(global-count normalisation, as in train/step.py).

Every pull first waits on the coordinator: sync/ssp until the clock's staleness bound
allows it, async until this worker's own earlier pushes are applied (coordinator.py
says why), so the parameters a worker computes on always contain its own updates.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn

from scaletrain.data.loader import StatefulLoader
from scaletrain.paramserver import coordinator as coord
from scaletrain.paramserver import server, transport
from scaletrain.config.batch_plan import BatchPlan
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import count_targets
from scaletrain.train.step import accumulate_gradients, loss_dtype, split_micro_batches
from scaletrain.train.step_loss import StepLoss


class Worker:
    def __init__(self, cfg, index: int, n_workers: int, model: nn.Module,
                 shards: list[list[str]], train_set, policy: PrecisionPolicy,
                 device: torch.device, batch: BatchPlan, loss: StepLoss):
        p = cfg.parallel
        self.cfg, self.w, self.model, self.policy, self.device = cfg, index, model, policy, device
        self.mode, self.steps = p.ps_consistency, cfg.train.steps
        self.s = 0 if self.mode == "sync" else p.ps_staleness
        params = dict(model.named_parameters())
        self.shard_params = [[params[n] for n in names] for names in shards]
        self.micro = batch.micro  # the run's batch plan over the workers
        self.loss = loss  # the run's micro-batch loss (train/step_loss.py), as spmd's
        self.loader = StatefulLoader(train_set, batch.full, rank=index,
                                     world=n_workers, seed=cfg.train.seed,
                                     shuffle=cfg.data.shuffle, assignment=cfg.data.assignment)
        self.delay = p.ps_slow_delay_s if p.ps_slow_worker == index else 0.0
        self.version = 0  # the oldest shard version of the parameters held here
        self.pushes = 0  # async: pushes the coordinator accepted, this session
        # Test hook: called with the clock after every step (fault tests kill from it).
        self.on_step = lambda clock: None

    def pull(self, clock: int) -> str:
        """Copy every shard's current tensors in, once the coordinator allows it (see the
        module docstring) — before starting `clock`; returns "ok", "dropped" or "stop"
        (a signal stopped the run)."""
        n = len(self.shard_params)
        if self.mode == "async":
            wait = (coord.rpc_wait_own_pull, self.w, self.pushes)
        else:  # SSP: start clock c only once every clock < c - s is applied.
            wait = (coord.rpc_wait_pull, self.w, clock - self.s)
        status, v0, t0 = transport.call(0, *wait, timeout=0)
        if status != "ok":
            return status
        # Every server has applied an update before the coordinator counts it.
        futs = [transport.call_async(s, server.rpc_pull) for s in range(1, n)]
        replies = [(v0, t0)] + [f.wait() for f in futs]
        with torch.no_grad():
            for params, (_, tensors) in zip(self.shard_params, replies):
                for p, t in zip(params, tensors):
                    p.copy_(t)
        self.version = min(v for v, _ in replies)
        return "ok"

    def gradient(self) -> tuple[list[list[torch.Tensor]], float, int]:
        """Per-shard gradients of the summed loss of the next batch, loss sum, targets:
        the spmd step's micro-batch loop (train/step.py) with a denominator of 1; the
        server divides by the update's total count."""
        x, y = self.loader.next()
        x, y = self.policy.cast_input(x.to(self.device)), y.to(self.device)
        self.model.zero_grad(set_to_none=True)
        micro_batches = split_micro_batches((x, y), self.micro)
        one = torch.ones((), dtype=loss_dtype(self.policy), device=self.device)
        loss_sum = accumulate_gradients(self.model, micro_batches, self.policy, self.loss,
                                        one)
        count = int(sum(count_targets(yb) for _, yb in micro_batches))
        grads = [[(p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
                  for p in params] for params in self.shard_params]
        return grads, float(loss_sum), count

    def run(self) -> int:
        """Train until train.steps clocks are done (or this worker is dropped)."""
        clock, loader_state = transport.call(0, coord.rpc_hello, self.w)
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        p = self.cfg.parallel
        start, acc, acc_loss, acc_count, acc_steps, acc_version = clock, None, 0.0, 0, 0, 0
        self.model.train()
        # sync/ssp: train.steps clocks; async: until the coordinator's sample budget
        # (train.steps x n_workers worker-steps, split by speed) is full.
        while self.mode == "async" or clock < self.steps:
            if self.mode != "async" or (clock - start) % p.ps_pull_every == 0:
                status = self.pull(clock)
                if status == "stop":  # a signal stopped the run (paramserver/stop.py)
                    break
                if status != "ok":
                    return self._dropped()
            grads, loss_sum, count = self.gradient()
            if acc is None:
                acc, acc_version = grads, self.version
            else:
                acc = [torch._foreach_add(a, g) for a, g in zip(acc, grads)]
            acc_loss, acc_count, acc_steps = acc_loss + loss_sum, acc_count + count, acc_steps + 1
            if self.delay:
                time.sleep(self.delay)
            clock += 1
            if self.mode != "async" or acc_steps == p.ps_push_every:
                key = f"c{clock - 1}" if self.mode != "async" else f"w{self.w}.{clock - 1}"
                for f in [transport.call_async(s, server.rpc_push, key, self.w, g)
                          for s, g in enumerate(acc) if s > 0]:
                    f.wait()  # the report must find every shard's buffer filled
                c = coord.Contribution(acc_version, acc_loss, acc_count, acc_steps, clock,
                                       self.loader.state_dict())
                answer = transport.call(0, coord.rpc_push_report, self.w, key, acc[0], c)
                if answer == "dropped":
                    return self._dropped()
                self.pushes += 1
                acc, acc_loss, acc_count, acc_steps = None, 0.0, 0, 0
                if answer == "stop":
                    break
            self.on_step(clock)
        transport.call(0, coord.rpc_finish, self.w)
        return clock

    def _dropped(self) -> int:
        print(f"scaletrain: PS worker {self.w} was dropped by the coordinator (too slow "
              f"or silent for parallel.ps_timeout_s); stopping this worker",
              file=sys.stderr, flush=True)
        return -1
