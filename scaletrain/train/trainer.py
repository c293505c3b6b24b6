"""The trainer: build every piece from the config, then run the short linear loop.

    build: runtime -> data -> model (meta, then init) -> optimizer -> schedule -> loader
    loop:  next batch -> train_step -> schedule step -> log / eval / checkpoint

Cross-cutting concerns (precision, metric sinks, progress) are objects handed in here,
not branches inside the loop (DESIGN.md principle 8).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from scaletrain.checkpoint import run_model
from scaletrain.checkpoint.decisions import Decision, Stop
from scaletrain.checkpoint.session import CheckpointSession
from scaletrain.config import Config
from scaletrain.config.batch_plan import batch_plan
from scaletrain.config.dims import ParallelDims
from scaletrain.data.mixture import tokens_by_source
from scaletrain.evaluate import evaluate
from scaletrain.finetune import resolve_init
from scaletrain.metrics import Progress, Throughput, measure_peak_flops
from scaletrain.metrics import peak_memory_mb
from scaletrain.models import count_params, spec_of
from scaletrain.models.loss_chunks_auto import resolve_loss_chunks, with_loss_chunks
from scaletrain.optim.schedules import observe_val_loss
from scaletrain.optim.step_end import StepEnd
from scaletrain.optim.strategy import build_strategy
from scaletrain.parallel.compile import StepClock
from scaletrain.parallel.context import DistContext
from scaletrain.parallel.model_parallel import build_pipeline
from scaletrain.parallel.pipeline_step import merge_stage_states
from scaletrain.parallel.weights import full_state_dict
from scaletrain.parallel.world import World
from scaletrain.plan.auto import auto_plan, write_record
from scaletrain.plan.malloc import tune_malloc
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.build import build_loader, build_loss, build_model, build_run_data
from scaletrain.train.build import data_facts, model_stats, open_sinks, shows_progress
from scaletrain.train.build import write_run_files
from scaletrain.train.device_guard import fault_guard
from scaletrain.train.dpo import DPOLoss
from scaletrain.train.faults import FaultMonitor, Rollback
from scaletrain.train.host_reads import LaggedReads, resolve_lag
from scaletrain.train.run_guard import resumes_in_place
from scaletrain.train.runtime import Runtime, detect_runtime, seed_everything
from scaletrain.train.recorder import RunRecorder
from scaletrain.train.state import TrainState
from scaletrain.train.step import StepOptions, split_micro_batches, train_step


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime, dims: ParallelDims, *,
                 plan_record: dict | None = None):
        """Build the run's pieces in order, each step handed what it needs (train/build.py).

        `runtime` and `dims`: this process's place and the run's layout, resolved once by
        whoever builds the run (`train`, `scaletrain bench`) and handed to everything here;
        `plan_record`: plan.auto's choice (summary.json "plan"), None when not planned."""
        if dims.world != runtime.world:  # a caller's bug: the layout of another world
            raise ValueError(f"ParallelDims of a world of {dims.world} ranks handed to a "
                             f"runtime of {runtime.world}")
        # init.from: model shape and tokenizer from the source (finetune/init_from.py);
        # resuming run.dir in place, from its own config and checkpoint instead.
        resuming = resumes_in_place(cfg)
        self.cfg = cfg = resolve_init(cfg, resuming=resuming)
        self.rt, self.plan_record = runtime, plan_record
        if self.rt.device.type == "cpu":  # before the model and data are allocated
            tune_malloc(cfg.train.malloc_mmap_threshold_mib)
        # The run's ParallelDims, handed to everything as self.dist.dims; process group and
        # device mesh (identities on one process).
        self.dist = DistContext.setup(cfg.parallel, self.rt.rank, dims, self.rt.device)
        self.spec = spec_of(cfg.model)
        self.policy = PrecisionPolicy(cfg.precision.dtype, self.rt.device)
        self.show_progress = shows_progress(cfg, self.rt)
        self.data, self.run_dir = self._run_data()
        facts = data_facts(self.data)
        # The run's batch plan (descent mode, ramp; full-batch: the whole split), computed
        # once here and handed to AC, the pipeline, the strategy and the summary.
        self.batch = batch_plan(cfg, self.dist.dims.dp, len(self.data.train),
                                pp=self.dist.dims.pp)
        # model.loss_chunks=-1 (auto) resolved from the batch plan's head micro-batch (a
        # pipeline's own), the value every later step (model, loss) reads, as
        # plan/report.py does (models/loss_chunks_auto.py)
        self.cfg = cfg = with_loss_chunks(cfg, resolve_loss_chunks(
            cfg, self.spec.kind, cfg.model.vocab_size or facts["vocab_size"],
            self.batch.head_micro, self.dist.dims.tp))
        self.parallel, self.ac_modes = build_model(cfg, facts, self.batch, self.dist,
                                                   self.policy, self.rt.device, resuming)
        self.model = self.parallel.module
        n_params = count_params(self.model)  # before a pipeline keeps this rank's stages
        # Optimizer (batch-scaled LR, fp32 masters for bf16-pure), LR schedule, batch plan
        # (descent mode, ramp) and the L1/L2 penalty hook: optim/strategy.py.
        self.strategy = build_strategy(cfg, self.model, self.policy, len(self.data.train),
                                       self.batch, self.parallel.tied_copies)
        self.optimizer, self.scheduler = self.strategy.optimizer, self.strategy.scheduler
        self.scaler = self.policy.make_scaler()
        # Micro-batches per rank in a full step of the resolved batch (`accum`; full-batch
        # descent: the whole train split; after any ramp), the last one possibly smaller.
        self.dp, self.micro, self.accum = self.dist.dims.dp, self.batch.micro, self.batch.accum
        self.loader = build_loader(cfg, self.data, self.dist)
        self.doc_eot, self.moe, self.loss = build_loss(
            cfg, self.parallel, self.dist, self.policy, self.rt.device, self.data, facts)
        self.pipeline = self._pipeline()
        self.state = TrainState()
        self.reads = self._host_reads()
        self._tokens_since_log = 0
        # The run's end of step and the layout's micro-batch loop (reducers, no_sync, norm).
        self.faults, self.step_end = self._end_of_step()
        self.step_opts = StepOptions(**self.dist.step_options(self.parallel))
        self.ckpt = self._checkpoint_session()
        self.ckpt.resume()  # before the metric sinks open (and append to) metrics.jsonl
        self.sinks = open_sinks(cfg, self.run_dir) if self.rt.is_main else None
        self.n_params, self.flops_per_token = model_stats(
            cfg, self.parallel, n_params, self.loss, self.pipeline, facts)
        self._peak_flops: float | None = None
        self.recorder = self._recorder()
        self.step_clock = StepClock()  # first (compiling) step timed apart: compile_s

    def _run_data(self):
        """The run's data (prepared by rank 0 if need be) and run directory, whose files
        rank 0 writes (config, tokenizer); then the global streams are seeded."""
        cfg = self.cfg
        data = build_run_data(cfg, self.rt, self.dist, self.show_progress)
        run_dir = Path(cfg.run.dir)
        if self.rt.is_main:
            write_run_files(cfg, data, run_dir)
        seed_everything(cfg.train.seed)
        return data, run_dir

    def _pipeline(self):
        """pp > 1: this rank's stage(s) and the schedule that runs the step (else None)."""
        return build_pipeline(self.parallel, self.dist, self.cfg.parallel, self.batch.per_rank,
                              self.micro, self.cfg.model, self.data.vocab_size,
                              self.policy.param_dtype, self.loss, self.moe)

    def _host_reads(self) -> LaggedReads:
        """Host reads of step values (tokens, fault guard, stop flag): one step late on a
        GPU (train/host_reads.py); at once under a batch ramp, which sizes the next batch
        by the tokens seen."""
        lag = 0 if self.strategy.batch_plan.ramp_tokens else \
            resolve_lag(self.cfg.train.host_reads, self.rt.device)
        return LaggedReads(lag, self.rt.device)

    def _end_of_step(self) -> tuple[FaultMonitor, StepEnd]:
        """The run's end of step (optim/step_end.py): clipping, the penalty hook and the
        guard that skips a bad update, with the fault monitor behind it (train/faults.py)."""
        cfg = self.cfg
        faults, guard = fault_guard(cfg.faults, self.optimizer, self.reads, self.state,
                                    has_scaler=self.scaler is not None,
                                    loss_reducer=self.dist.sum_reducer)
        return faults, StepEnd(grad_clip=cfg.train.grad_clip,
                               grad_clip_value=cfg.train.grad_clip_value,
                               add_penalty_grads=self.strategy.penalty, guard=guard,
                               after_step=self.moe.end_step if self.moe else None)

    def _checkpoint_session(self) -> CheckpointSession:
        """Checkpointing handed what it saves (torchtitan's `CheckpointManager(states=)`)
        and the fault monitor and rollback it consults; it writes none of them."""
        cfg = self.cfg
        states = {"model": self.model, "optimizer": self.optimizer,
                  "scheduler": self.scheduler, "scaler": self.scaler, "loader": self.loader,
                  "train_state": self.state, "faults": self.faults}
        rollback = Rollback(self.faults, self.loader, self.scheduler, self.optimizer,
                            self.state, cfg.faults.rollback_lr_factor)
        return CheckpointSession(
            states, cfg=cfg, run_dir=self.run_dir,
            metrics_path=self.run_dir / "metrics.jsonl",
            rank=self.rt.rank, is_main=self.rt.is_main, device=self.rt.device,
            reads=self.reads, log=self.log, faults=self.faults, rollback=rollback,
            on_signal=cfg.checkpoint.on_signal, tied_copies=self.parallel.tied_copies)

    # -- metrics -----------------------------------------------------------------------
    def peak_flops(self) -> float:
        """The device's measured matmul peak in the compute dtype (cached per machine)."""
        if self._peak_flops is None:
            dt = self.policy.compute_dtype
            self._peak_flops = measure_peak_flops(dt if dt != torch.float64 else torch.float32,
                                                  self.rt.threads, self.rt.device)
        return self._peak_flops

    def world_peak_flops(self) -> float:
        """The peak of every rank together: tokens/s are global (all data-parallel ranks)
        and FLOPs/token the whole model's (all TP/PP ranks), so MFU divides by world ×
        one device's peak."""
        return self.peak_flops() * self.rt.world

    def log(self, record: dict) -> None:
        if self.sinks is not None:
            self.sinks.write(record)

    # -- evaluation, keep-best, the end of the run: train/recorder.py ----------------
    def _recorder(self) -> RunRecorder:
        return RunRecorder(
            self.cfg, self.run_dir, self.data, self.state, run_eval=self._run_eval,
            save_weights=self.save_weights,
            load_weights=lambda path: run_model.load_weights(self.model, path, self.spec.tied),
            log=self.log, is_main=self.rt.is_main, rank=self.dist.dp_rank, world=self.dp,
            barrier=self.dist.barrier,
            # plateau schedules reduce the LR from validation losses
            on_val=lambda loss: observe_val_loss(self.scheduler, loss))

    def _run_eval(self, split: str, batches) -> dict:
        batches = ((self.policy.cast_input(x.to(self.rt.device)), y.to(self.rt.device))
                   for x, y in batches)
        if isinstance(self.loss, DPOLoss):  # DPO loss and accuracy of the split's pairs
            return self.loss.evaluate(self.model, batches, self.policy, self.dist.sum_reducer)
        if self.pipeline is not None:  # forward through the stages (schedule.eval)
            with self.policy.autocast():
                return self.pipeline.evaluate(batches, self.dist.sum_reducer,
                                              self.pipeline.batch_size)
        return evaluate(self.model, batches, self.policy, self.rt.device,
                        self.spec.kind, count_reducer=self.dist.sum_reducer,
                        eot_id=self.doc_eot)

    def save_weights(self, path: Path) -> None:
        """Gather full weights (a collective when sharded: every rank calls) and let
        rank 0 write them."""
        # A pipeline rank holds its stages' weights: full on every rank (under FSDP2 the
        # default gathers to global rank 0, which holds none of a later stage's).
        state = full_state_dict(self.model, every_rank=self.pipeline is not None)
        if self.pipeline is not None:
            state = merge_stage_states(self.dist.gather(state))
        if self.rt.is_main:
            run_model.save_weights(self.model, path, self.cfg, state=state)

    # -- the loop ----------------------------------------------------------------------
    def next_micro_batches(self):
        # Descent mode / batch ramp: draw this step's global batch size from the sampler.
        self.loader.set_batch_size(self.strategy.batch_plan.batch_size(self.state.tokens))
        x, y = self.loader.next()
        x, y = x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)
        x = self.policy.cast_input(x)  # fp64 / bf16-pure image inputs
        return split_micro_batches((x, y), self.micro)

    def train_one_step(self):
        """One optimizer step on the next global batch; returns (StepResult, lr used)."""
        st = self.state
        micro_batches = self.next_micro_batches()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.pipeline is not None:  # the schedule runs the micro-batch loop
            result = self.pipeline.step(micro_batches, self.optimizer, self.policy,
                                        self.step_opts, self.step_end)
        else:
            result = train_step(self.model, micro_batches, self.optimizer, self.policy,
                                self.scaler, self.step_opts, step_loss=self.loss,
                                end=self.step_end)
        self.scheduler.step()
        st.step += 1
        st.skipped_steps += int(result.skipped)
        self.reads.push(result.n_targets.reshape(1), self._count_tokens)
        self.reads.end_step()
        return result, lr

    def _count_tokens(self, n: list) -> None:
        self.state.tokens += int(n[0])
        self._tokens_since_log += int(n[0])

    def fit(self) -> dict | Stop:
        """Train to `train.steps`; the summary, or the `Stop` of a SIGTERM/SIGINT (its
        checkpoint saved, metric sinks closed; the CLI exits with its code)."""
        cfg, st = self.cfg, self.state
        progress = Progress(cfg.train.steps, initial=st.step, enabled=cfg.train.progress
                            if self.rt.is_main else "off")
        meter = Throughput()
        if cfg.eval.interval and st.step == 0:
            self.recorder.validate(st.step)
        self.model.train()
        meter.start()
        t0 = time.perf_counter()
        self._tokens_since_log, last = 0, {}
        self.ckpt.install_signal_handlers()  # SIGTERM/SIGINT: finish the step, save, stop
        while st.step < cfg.train.steps:
            t_step = time.perf_counter()
            result, lr = self.train_one_step()
            self.step_clock.add(time.perf_counter() - t_step)
            if st.step % cfg.train.log_interval == 0 or st.step == cfg.train.steps:
                self.reads.flush()  # the step's values on the host: log steps only
                last = self._log_train(result, lr, meter, self._tokens_since_log)
                self._tokens_since_log = 0
                progress.update(st.step, loss=last["loss"], lr=lr,
                                tok_s=last["tokens_per_s"])
            if cfg.eval.interval and st.step % cfg.eval.interval == 0 \
                    and st.step != cfg.train.steps:
                val = self.recorder.validate(st.step)
                if self.rt.is_main:  # one line per run, not one per rank
                    progress.write(f"step {st.step}: val loss {val['loss']:.4f}")
            # Faults (skip log, rollback), interval save, a signal (save, stop).
            decision: Decision = self.ckpt.after_step(st.step, best_step=st.best_step)
            if isinstance(decision, Stop):
                progress.close()
                if self.sinks is not None:
                    self.sinks.close()
                return decision  # RolledBack: the state is the checkpoint's; go on
            if cfg.train.compile and not self.step_clock.rest and st.step < cfg.train.steps:
                meter.start()  # tokens/s without the compiling first step (compile_s)
                self.reads.flush()
                self._tokens_since_log = 0
        self.ckpt.at_end(st.step, best_step=st.best_step)
        progress.close()
        st.wall_time += time.perf_counter() - t0
        return self.finish(last, meter)

    def _log_train(self, result, lr: float, meter: Throughput, tokens: int) -> dict:
        meter.step(tokens)
        tok_s = meter.lap()
        # result.loss is this rank's share of the global mean: the sum over ranks is it
        # (a collective; every rank logs at the same steps).
        loss = self.dist.sum_reducer(result.loss.detach().clone()).item()
        record = {"kind": "train", "step": self.state.step, "loss": loss,
                  "lr": lr, "grad_norm": result.grad_norm.item(), "tokens": self.state.tokens,
                  "tokens_per_s": tok_s,
                  "mfu": (meter.mfu(self.flops_per_token, self.world_peak_flops(), tok_s)
                          if self.flops_per_token else None),
                  "mem_mb": peak_memory_mb(self.rt.device)}
        if self.moe is not None:  # the router's health, counted once (not in "loss")
            record.update(self.moe.record())
        record.update(self.loss.record(self.dist.sum_reducer))  # DPO's rewards (a collective)
        seen = tokens_by_source(self.loader.sampler, self.cfg.model.seq_len)
        if seen is not None:  # data.mixture: the loader's global counts (every rank's)
            record["tokens_by_source"] = seen
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.get_scale()
            record["skipped_steps"] = self.state.skipped_steps
        self.log(record)
        return record

    def finish(self, last_train: dict, meter: Throughput) -> dict:
        """Validation, final weights, test on the best weights, summary and plots
        (train/recorder.py); the fields below are this layout's."""
        cfg, st = self.cfg, self.state
        tok_s = meter.avg_tokens_per_s

        def details() -> dict:
            return {
                "tokens_per_s": tok_s,
                "mfu": (meter.mfu(self.flops_per_token, self.world_peak_flops(), tok_s)
                        if self.flops_per_token else None),
                "peak_flops": self._peak_flops,
                "peak_mem_mb": peak_memory_mb(self.rt.device),
                "wall_time_s": st.wall_time, "skipped_steps": st.skipped_steps,
                **self.step_clock.report(compiled=cfg.train.compile),
                "threads": self.rt.threads,
                "interop_threads": torch.get_num_interop_threads(),
                "device": str(self.rt.device),
                "world_size": self.rt.world, "precision": cfg.precision.dtype,
                # model.loss_chunks as resolved (auto, -1: models/loss_chunks_auto.py)
                "loss_chunks": cfg.model.loss_chunks,
                "plan": self.plan_record,  # plan.auto's choice (train())
                "parallel": {"strategy": self.dist.dims.strategy, "dp": self.dp,
                             "dp_replicate": self.dist.dims.dp_replicate,
                             "dp_shard": self.dist.dims.dp_shard,
                             "tp": self.dist.dims.tp, "pp": self.dist.dims.pp,
                             "ep": self.dist.dims.ep,
                             "accumulation_steps": self.accum, "ac_blocks": self.ac_modes},
                # What differs between ranks (memory, speed); a collective, all ranks call.
                "ranks": self.dist.gather({"rank": self.rt.rank, "tokens_per_s": tok_s,
                                           "peak_mem_mb": peak_memory_mb(self.rt.device),
                                           "wall_time_s": st.wall_time}),
            }

        return self.recorder.finish(st.step, tokens=st.tokens, params=self.n_params,
                                    train_loss=last_train.get("loss"), details=details,
                                    close=self.sinks.close if self.sinks else lambda: None)


def train(cfg: Config, world: World, dims: ParallelDims) -> dict | Stop:
    """Train `cfg` to the end and return its summary (or the `Stop` of a signal).

    `world`: this process's place in the world (the CLI read it once); `dims`: the run's
    layout, as the CLI's validation resolved it (parallel/world_checks.py `check_world`);
    plan.auto keeps it. Parameter-server mode is paramserver/'s `train_ps` (cli/train.py picks)."""
    rt = detect_runtime(cfg.train.device, cfg.train.threads, world)
    cfg, plan_record = auto_plan(cfg, world, dims)  # memory techniques that fit (plan/)
    trainer = Trainer(cfg, rt, dims, plan_record=plan_record)  # -> summary.json "plan"
    write_record(cfg.run.dir, plan_record, rt.is_main)
    with trainer.dist.guard():  # a dead or hung peer: one clear line, no hang
        summary = trainer.fit()
    if isinstance(summary, Stop):
        # Stopped by a signal, checkpoint saved: the CLI exits 128 + N next. The group is
        # left to the process's exit, as a stop always did.
        return summary
    # Only after success: tearing the group down while a failed rank's peers are still
    # inside a collective would deadlock (torchtitan #1342 does the same).
    trainer.dist.close()
    return summary
