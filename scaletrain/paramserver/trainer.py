"""Parameter-server training (`parallel.mode = "ps"`): roles, run directory, metrics.

Launched like every mode (`scaletrain train --nproc N`, or torchrun across nodes):
ranks [0, ps_servers) are servers, the others workers (worker i = rank ps_servers + i).
Rank 0 is also the coordinator (coordinator.py) and the only process that writes the
run directory: metrics.jsonl, TensorBoard (with the staleness histogram), checkpoints,
weights, summary. Validation runs there too, on the parameters of exactly the update
that completed the step (the applier thread evaluates between two updates).

Every process builds the full model from the seed (bitwise the single-process initial
weights); servers keep their shard of it, workers a full replica for the forward.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from scaletrain.checkpoint import run_model
from scaletrain.checkpoint.compat import changed_settings
from scaletrain.checkpoint.decisions import Stop
from scaletrain.config import Config, run_files, to_dict
from scaletrain.config.batch_plan import batch_plan
from scaletrain.config.ps_checks import check_ps
from scaletrain.data.build import build_data
from scaletrain.data.chat import save_chat_files
from scaletrain.errors import ConfigError
from scaletrain.evaluate import evaluate
from scaletrain.metrics import Progress, build_sinks, peak_memory_mb
from scaletrain.metrics.trackers import tracker_sinks
from scaletrain.models import REGISTRY, build_model, count_params
from scaletrain.models.documents import masking_eot
from scaletrain.paramserver import checkpoint as ckpt
from scaletrain.paramserver import coordinator as coord_mod
from scaletrain.paramserver import server, stop, transport
from scaletrain.paramserver.sharding import assign_shards
from scaletrain.paramserver.worker import Worker
from scaletrain.parallel.compile import head_computes_loss
from scaletrain.plan.malloc import tune_malloc
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.faults import FaultMonitor
from scaletrain.train.recorder import RunRecorder
from scaletrain.train.run_guard import prepare_run_dir
from scaletrain.train.runtime import detect_runtime, seed_everything
from scaletrain.train.state import TrainState
from scaletrain.train.step_loss import build_step_loss


def train_ps(cfg: Config, worker_hook=None) -> dict | Stop:
    """Run this process's role to the end; rank 0 returns the run's summary (or the
    `Stop` of a SIGTERM/SIGINT: checkpoint saved, the CLI exits with its code).

    `worker_hook(worker)` (tests) may set `worker.on_step` before the worker starts.
    """
    rt = detect_runtime(cfg.train.device, cfg.train.threads)
    if rt.world < 2:
        raise ConfigError("parallel.mode='ps' needs at least 2 processes: --nproc N with "
                          "N > parallel.ps_servers")
    check_ps(cfg, rt.world)
    n_servers = cfg.parallel.ps_servers
    n_workers = rt.world - n_servers
    is_server = rt.rank < n_servers
    device = torch.device("cpu") if is_server else rt.device  # shards live in host memory
    if device.type == "cpu":  # before the model and data are allocated, as the Trainer
        tune_malloc(cfg.train.malloc_mmap_threshold_mib)
    policy = PrecisionPolicy(cfg.precision.dtype, device)
    data = build_data(cfg, progress=False)
    seed_everything(cfg.train.seed)
    facts = {"vocab_size": data.vocab_size, "input_shape": data.input_shape,
             "num_classes": data.num_classes}

    def new_model():
        return build_model(cfg.model, facts, seed=cfg.train.seed, device=device,
                           dtype=policy.param_dtype)

    model = new_model()
    shards = assign_shards({n: p.numel() for n, p in model.named_parameters()}, n_servers)
    # A shape change is refused before any shard is touched (the launcher checked too).
    resume = ckpt.check_resume(cfg) if is_server else None
    # Build every role's state before joining: the RPC rendezvous is the barrier after
    # which workers may call.
    if is_server:
        shard = server.ShardServer(cfg, model, shards[rt.rank], rt.rank)
        if resume is not None:
            shard.load_state_dict(ckpt.load(resume, f"server-{rt.rank}"))
        server.install(shard)
    run = _Run(cfg, rt, data, policy, new_model, n_workers, resume) if rt.rank == 0 else None
    transport.start(rt.rank, rt.world, cfg.parallel.ps_timeout_s)
    stop.install(cfg.checkpoint.on_signal,
                 run.coord.request_stop if rt.rank == 0 else stop.ask_coordinator)
    try:
        if rt.rank == 0:
            return run.fit()
        if is_server:
            server.wait_for_stop()
            return {"role": "server", "rank": rt.rank}
        # The spmd trainer's loss for this model (in-model head loss for a GPT).
        loss = build_step_loss(loss_in_model=head_computes_loss(model, cfg.parallel),
                               eot_id=masking_eot(cfg.data.document_masking, data.tokenizer))
        w = Worker(cfg, rt.rank - n_servers, n_workers, model, shards, data.train, policy,
                   device, batch_plan(cfg, n_workers, pp=1), loss)  # no pipeline
        if worker_hook is not None:
            worker_hook(w)
        return {"role": "worker", "rank": rt.rank, "clock": w.run()}
    finally:
        transport.stop()


def _report_resume(path: Path, saved: dict | None, now: dict) -> None:
    """Rank 0's lines on a resume, as the main trainer prints them (checkpoint/session.py):
    where from, and the settings that changed (applied from the resumed step on)."""
    print(f"scaletrain: resumed from {path.name} ({path.parent})", file=sys.stderr,
          flush=True)
    changes = changed_settings(saved, now) if saved is not None else []
    if changes:
        print("scaletrain: resuming with changed settings: " + "; ".join(changes),
              file=sys.stderr, flush=True)


class _Run:
    """Rank 0: the coordinator plus everything a run writes."""

    def __init__(self, cfg, rt, data, policy, new_model, n_workers, resume):
        self.cfg, self.rt, self.data, self.policy = cfg, rt, data, policy
        self.run_dir = Path(cfg.run.dir)
        prepare_run_dir(cfg)
        if data.tokenizer is not None:
            data.tokenizer.save(self.run_dir / run_files.TOKENIZER_FILE)
        if cfg.data.format == "chat":  # a resume renders with the run's own copy
            save_chat_files(cfg.data.tokenizer, cfg.data.chat_template, self.run_dir)
        self.model = new_model()  # evaluation replica, filled from the servers
        self.names = [n for n, _ in self.model.named_parameters()]
        self.kind = REGISTRY[cfg.model.name].kind
        state = ckpt.load(resume, "coordinator") if resume is not None else {}
        if resume is not None:
            _report_resume(resume, ckpt.saved_config(resume), to_dict(cfg))
        # Best validation loss and step: the run recorder's (train/recorder.py).
        self.state = TrainState(best_val=float(state.get("best_val", float("inf"))),
                                best_step=int(state.get("best_step", 0)))
        self.wall_prev = float(state.get("wall_time", 0.0))
        self.coord = coord_mod.Coordinator(cfg, n_workers, state.get("coordinator"),
                                           on_update=self.on_update, on_event=self.on_event,
                                           faults=FaultMonitor(cfg.faults))
        coord_mod.install(self.coord)
        self.sinks = build_sinks(self.run_dir, console=False, tensorboard=True,
                                 trackers=tracker_sinks(cfg.metrics, self.run_dir,
                                                        to_dict(cfg)))
        from torch.utils.tensorboard import SummaryWriter

        self.hist_writer = SummaryWriter(str(self.run_dir / "tensorboard"), flush_secs=10)
        # Evaluation, keep-best, final weights, test on the best weights, summary and
        # plots: the spmd trainer's recorder; wall_s: seconds since this session's start
        # (bench/paramserver.py: time to a loss).
        self.recorder = RunRecorder(
            cfg, self.run_dir, data, self.state, run_eval=self._run_eval,
            save_weights=lambda path: run_model.save_weights(self.model, path, cfg),
            load_weights=lambda path: run_model.load_weights(self.model, path,
                                                             REGISTRY[cfg.model.name].tied),
            log=self.sinks.write, eval_extra=lambda: {"wall_s": time.perf_counter() - self.t0})
        self.progress = Progress(cfg.train.steps, initial=self.coord.step,
                                 enabled=cfg.train.progress)
        # The logged loss is the logged step's own (as the main trainer logs it): the
        # updates since the previous step — one in sync/ssp, the pushes that completed
        # the step's samples in async. Staleness counts every applied gradient once, over
        # the log interval.
        self._step_loss = {"loss": 0.0, "tokens": 0}
        self._stale: list[int] = []
        self.last_train: dict = {}
        self.t0 = self.t_log = time.perf_counter()
        self.tokens_at_log = self.coord.tokens

    # -- hooks from the applier thread (between two updates) ----------------------------
    def on_update(self, u: coord_mod.Update) -> None:
        if u.fault is not None:  # a skipped update, logged as the spmd trainer does
            self.sinks.write({"kind": "fault", "step": u.step, **u.fault})
        if u.rollback is not None:  # faults.max_consecutive of them (coordinator.py)
            self.sinks.write(u.rollback)
        step = self._step_loss
        step["loss"] += u.loss * u.tokens
        step["tokens"] += u.tokens
        self._stale += u.staleness
        c = self.cfg
        crossed = lambda every: every and u.step // every > u.prev_step // every
        if u.step == u.prev_step:
            return
        step_loss = step["loss"] / max(step["tokens"], 1)
        self._step_loss = {"loss": 0.0, "tokens": 0}
        if crossed(c.train.log_interval) or u.step >= c.train.steps:
            self._log_train(u, step_loss)
        if crossed(c.eval.interval) and u.step < c.train.steps:
            val = self.recorder.validate(u.step)
            self.progress.write(f"step {u.step}: val loss {val['loss']:.4f}")
        if crossed(c.checkpoint.interval) and u.step < c.train.steps:
            self.save_checkpoint(u.step)

    def on_event(self, event: dict) -> None:
        print(f"scaletrain: PS: {event}", file=sys.stderr, flush=True)
        self.sinks.write({"kind": "ps_event", "step": self.coord.step, **event})

    def _log_train(self, u, loss: float) -> None:
        now = time.perf_counter()
        stale = self._stale or [0]
        counts = {str(s): stale.count(s) for s in sorted(set(stale))}
        tok_s = (self.coord.tokens - self.tokens_at_log) / max(now - self.t_log, 1e-9)
        record = {"kind": "train", "step": u.step, "loss": loss,
                  "lr": u.lr, "grad_norm": u.grad_norm, "tokens": self.coord.tokens,
                  "tokens_per_s": tok_s, "mfu": None, "mem_mb": peak_memory_mb(self.rt.device),
                  "version": u.version, "workers": len(self.coord.live),
                  "staleness_max": max(stale), "staleness_mean": sum(stale) / len(stale),
                  "staleness_counts": counts}
        self.sinks.write(record)
        if self._stale:
            self.hist_writer.add_histogram("ps/staleness", torch.tensor(self._stale), u.step)
        self.progress.update(u.step, loss=loss, lr=u.lr, tok_s=tok_s)
        self.last_train = record
        self._stale = []
        self.t_log, self.tokens_at_log = now, self.coord.tokens

    # -- parameters, evaluation, checkpoints ------------------------------------------
    def pull_full(self) -> None:
        """Copy every server's current shard into the evaluation replica."""
        params = dict(self.model.named_parameters())
        futs = [transport.call_async(s, server.rpc_pull)
                for s in range(self.cfg.parallel.ps_servers)]
        shards = assign_shards({n: p.numel() for n, p in params.items()},
                               self.cfg.parallel.ps_servers)
        with torch.no_grad():
            for names, f in zip(shards, futs):
                for n, t in zip(names, f.wait()[1]):
                    params[n].copy_(t)

    def _run_eval(self, split: str, batches) -> dict:
        """The recorder's evaluation: validation on the servers' current parameters,
        the test on the replica as the recorder left it (the best weights)."""
        if split == "val":
            self.pull_full()
        return evaluate(self.model, batches, self.policy, self.policy.device, self.kind,
                        eot_id=masking_eot(self.cfg.data.document_masking, self.data.tokenizer))

    def save_checkpoint(self, step: int) -> Path:
        states = [transport.call(s, server.rpc_state_dict)
                  for s in range(self.cfg.parallel.ps_servers)]
        extra = {"coordinator": self.coord.state_dict(), "best_val": self.state.best_val,
                 "best_step": self.state.best_step,
                 "wall_time": self.wall_prev + time.perf_counter() - self.t0}
        k = self.cfg.checkpoint
        return ckpt.save(self.run_dir, step, states, extra, k.keep,
                         config=to_dict(self.cfg),
                         best_step=self.state.best_step if k.keep_best else None)

    # -- the run ------------------------------------------------------------------------
    def fit(self) -> dict | Stop:
        cfg, c = self.cfg, self.coord
        try:
            if cfg.eval.interval and c.step == 0:
                self.recorder.validate(0)
            c.run()  # until every live worker has finished (or a signal stopped it)
            wall = self.wall_prev + time.perf_counter() - self.t0
            self.progress.close()
            if c.stop_signal is not None:  # checkpoint.on_signal (paramserver/stop.py)
                path = self.save_checkpoint(c.step)
                self._close()
                stop.report(c.stop_signal, c.step, path.name)
                return Stop(step=c.step, exit_code=128 + c.stop_signal)
            return self.recorder.finish(
                c.step, tokens=c.tokens, params=count_params(self.model),
                train_loss=self.last_train.get("loss"), details=lambda: self._details(wall),
                before_test=lambda: self.save_checkpoint(c.step), close=self._close)
        finally:
            for s in range(1, cfg.parallel.ps_servers):
                try:
                    transport.call(s, server.rpc_stop)
                except RuntimeError:  # that server is gone already
                    pass

    def _close(self) -> None:
        self.sinks.close()
        self.hist_writer.close()

    def _details(self, wall: float) -> dict:
        """summary.json's PS fields, after the recorder's common ones."""
        c, p = self.coord, self.cfg.parallel
        n_stale = sum(c.hist.values())
        return {
            "tokens_per_s": c.tokens / max(wall, 1e-9), "mfu": None,
            "peak_mem_mb": peak_memory_mb(self.rt.device), "wall_time_s": wall,
            "world_size": self.rt.world, "precision": self.cfg.precision.dtype,
            "device": str(self.rt.device), "threads": self.rt.threads,
            "mode": "ps", "ps_consistency": p.ps_consistency, "ps_servers": p.ps_servers,
            "ps_workers": c.n_workers, "ps_updates": c.version,
            "ps_workers_finished": len(c.live & c.finished),
            "staleness_hist": {str(k): v for k, v in sorted(c.hist.items())},
            "staleness_max": max(c.hist) if c.hist else 0,
            "staleness_mean": (sum(k * v for k, v in c.hist.items()) / n_stale
                               if n_stale else 0.0),
        }
