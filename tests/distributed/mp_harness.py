"""A small training run on any TP × PP × DP layout, built from the trainer's pieces
(DistContext, build_parallel_model, build_pipeline, train_step / Pipeline.step).

`mp_run(rank, world, spec)` trains a tiny GPT (or spec["model"]'s family) on synthetic tokens (harness.Tokens) and
returns on every rank the global loss and grad norm of each step; world=1 is the
reference. Vocabulary 64 (harness.Tokens' ids folded), so tp in {1, 2, 4} divides it. Optionally saves a DCP checkpoint (checkpoint/manager.py) after the run, or
loads one before it.
"""

from __future__ import annotations

import torch

from harness import T, Tokens

V = 64  # divisible by tp (the vocabulary is sharded); harness.V = 67 is not


class Tokens64(Tokens):
    """harness.Tokens with ids in [0, 64); with `eot` set, that id also ends a document
    every few tokens (at varying offsets), for document-masking runs."""

    def __init__(self, n: int = 64, masked: bool = False, seed: int = 0,
                 eot: int | None = None):
        super().__init__(n, masked, seed)
        self.x %= V
        self.y[self.y >= 0] %= V
        if eot is not None:
            for i in range(n):  # boundaries at 3 + i % 4, then every 5 tokens
                self.x[i, 3 + i % 4::5] = eot
import dataclasses

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.data.loader import StatefulLoader
from scaletrain.models.moe_terms import moe_step_terms
from scaletrain.optim import build_optimizer
from scaletrain.optim.step_end import StepEnd
from scaletrain.parallel.context import DistContext
from scaletrain.config.dims import resolve_dims
from scaletrain.parallel.model_parallel import build_pipeline
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.parallel.pipeline_moe import pipeline_moe_terms
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.step import StepOptions, split_micro_batches, train_step
from scaletrain.train.step_loss import build_step_loss


def mp_spec(**kw) -> dict:
    spec = dict(steps=20, batch=8, micro=2, tp=1, pp=1, dp_shard=1, dp_replicate=1,
                schedule="1f1b", ep=1, n_layer=2, d_model=32, n_head=2, sp=False, lp=True,
                ac="none",  # parallel.activation_checkpoint (the reference runs without)
                grad_clip=0.05, dtype="fp32", save=None, load=None, masked=False,
                faults=False, nan_step=0, params=False, eot=None,
                model=())  # model: extra ModelConfig fields as (name, value) pairs
    spec.update(kw)
    return spec


def mp_run(rank: int, world: int, spec: dict) -> dict:
    device = torch.device("cpu")
    one = world == 1
    pcfg = ParallelConfig(dp_replicate=1 if one else spec["dp_replicate"],
                          dp_shard=1 if one else spec["dp_shard"],
                          tp=1 if one else spec["tp"], pp=1 if one else spec["pp"],
                          ep=1 if one else spec["ep"],
                          pp_schedule=spec["schedule"], timeout_s=60,
                          sequence_parallel=spec["sp"], loss_parallel=spec["lp"],
                          activation_checkpoint="none" if one else spec["ac"])
    ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), device)
    policy = PrecisionPolicy(spec["dtype"], device)
    mcfg = ModelConfig(n_layer=spec["n_layer"], n_head=spec["n_head"],
                       d_model=spec["d_model"], seq_len=T, **dict(spec["model"]))
    pm = build_parallel_model(mcfg, {"vocab_size": V}, seed=3, dims=ctx.dims,
                              mesh=ctx.mesh, pcfg=pcfg, policy=policy, device=device,
                              expert_mesh=ctx.expert_mesh)
    model = pm.module
    dp = ctx.dims.dp
    # eot: data.document_masking at that id (the trainer's masking_eot)
    # model.loss_chunks: the in-model chunked head + loss on every layout (run_loss's rule)
    loss = build_step_loss(loss_parallel=pm.tp_loss_parallel, eot_id=spec["eot"],
                           loss_in_model=mcfg.loss_chunks > 0)
    # MoE layers: wired as train/build.py does (a pipeline rank: the whole model's rows,
    # each stage's terms into its own backward; else the step loss's `extra`).
    moe = (pipeline_moe_terms(pm, mcfg, {"vocab_size": V}, device, ctx.mesh)
           if ctx.dims.pp > 1 else
           moe_step_terms(model, ctx.sum_reducer, mcfg.moe_bias_update_rate))
    if moe is not None:
        loss = dataclasses.replace(loss, extra=moe.collect)
    pipe = build_pipeline(pm, ctx, pcfg, spec["batch"] // dp, spec["micro"], mcfg, V,
                          policy.param_dtype, loss, moe)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2),
                          embedding_copies=pm.tied_copies)
    loader = StatefulLoader(Tokens64(masked=spec["masked"], eot=spec["eot"]), spec["batch"],
                            rank=ctx.dp_rank,
                            world=dp, seed=5)
    opts = StepOptions(**ctx.step_options(pm))
    monitor = _fault_guard(model, pm.spec, ctx, spec) if spec["faults"] else None
    end = StepEnd(grad_clip=spec["grad_clip"], guard=monitor.guard if monitor else None,
                  after_step=moe.end_step if moe is not None else None)
    if spec["load"]:
        _checkpoint(model, opt, spec["load"], save=False, aliases=pm.tied_copies)
        loader.load_state_dict(torch.load(f"{spec['load']}/loader.pt"))
    losses, norms, skipped, moe_records = [], [], [], []
    for step in range(1, spec["steps"] + 1):
        model._harness_step = step  # read by the NaN-injecting hook
        micro = split_micro_batches(loader.next(), spec["micro"])
        r = (pipe.step(micro, opt, policy, opts, end) if pipe is not None
             else train_step(model, micro, opt, policy, None, opts, step_loss=loss, end=end))
        losses.append(ctx.sum_reducer(r.loss.clone()).item())
        norms.append(float(r.grad_norm))
        skipped.append(bool(r.skipped))
        if moe is not None:  # the metrics.jsonl fields of the step (every rank's)
            moe_records.append(moe.record())
    if spec["save"]:
        _checkpoint(model, opt, spec["save"], save=True, aliases=pm.tied_copies)
        if rank == 0:
            torch.save(loader.state_dict(), f"{spec['save']}/loader.pt")
    out = {"losses": losses, "norms": norms, "skipped": skipped}
    if moe is not None:
        out["moe_records"] = moe_records
    if ctx.dims.ep > 1:  # rows of each MoE layer's local expert slice: E / ep / efsdp
        out["local_experts"] = [m.experts.gate_proj.to_local().shape[0] for m in moe.layers]
    if spec["params"]:  # this rank's full parameters (a pipeline rank: its stages')
        from scaletrain.parallel.weights import full_state_dict

        out["params"] = full_state_dict(model, every_rank=ctx.dims.pp > 1)
    if monitor is not None:  # the losses the fault guard saw and accepted
        out["guard_history"] = list(monitor.history)
    return out


def _fault_guard(model, family, ctx, spec: dict):
    """The trainer's fault monitor (its `guard` goes into the StepEnd); with
    spec["nan_step"], the final norm's output turns NaN at that step (on the last
    pipeline stage, which alone has it: the first of the family's PipelineSplit.last,
    GPT's `ln_f`, Llama's `norm`)."""
    from scaletrain.config.schema import FaultsConfig
    from scaletrain.train.faults import FaultMonitor

    monitor = FaultMonitor(FaultsConfig(), loss_reducer=ctx.sum_reducer)
    final_norm = getattr(model, family.pipeline.last[0])
    if spec["nan_step"] and final_norm is not None:
        final_norm.register_forward_hook(
            lambda m, a, out: out * float("nan")
            if model._harness_step == spec["nan_step"] else out)
    return monitor


def _checkpoint(model, opt, path: str, save: bool, aliases: dict) -> None:
    """Model + optimizer through DCP, as checkpoint/manager.py does (with its TP hooks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from scaletrain.parallel.checkpoint_layout import (restore_layout, savable,
                                                        tied_load_names, tied_own_names)

    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Flattened optimizer state ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): each
    # pipeline stage saves only its own parameters' entries (torchtitan does the same).
    o = StateDictOptions(flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(model, opt, options=o)
    state = savable({"model": msd, "optim": osd})
    if save:
        dcp.save(state, checkpoint_id=path)
        return
    # `aliases`: the pipeline's tied head copy (ParallelModel.tied_copies), as the
    # manager is given them.
    state = tied_load_names(state, aliases)
    dcp.load(state, checkpoint_id=path)
    state = tied_own_names(state, aliases)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=o)
    restore_layout(opt)


_REFERENCES: dict = {}


def reference(spec: dict) -> dict:
    """The one-process run of `spec` (cached per test session: several layouts share it)."""
    key = tuple(sorted((k, v) for k, v in spec.items()
                       if k not in ("tp", "pp", "dp_shard", "dp_replicate", "ep", "schedule",
                                    "sp", "lp", "ac", "save", "load", "params")))
    if key not in _REFERENCES:
        _REFERENCES[key] = mp_run(0, 1, {**spec, "params": True})
    return _REFERENCES[key]


def assert_parity(ref: dict, got: dict, first_tol: float = 1e-6, tol: float = 1e-5) -> None:
    """First-step loss to `first_tol` relative, every step's loss to `tol` (issue #6)."""
    a, b = ref["losses"], got["losses"]
    assert len(a) == len(b)
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    assert rel[0] <= first_tol, f"first-step loss {b[0]!r} vs {a[0]!r} (rel {rel[0]:.2e})"
    worst = max(range(len(rel)), key=rel.__getitem__)
    assert rel[worst] <= tol, (f"step {worst + 1}: loss {b[worst]!r} vs {a[worst]!r} "
                               f"(rel {rel[worst]:.2e})")


def mp_runs(rank: int, world: int, specs: list[dict]) -> list[dict]:
    """Several runs in one spawned process group (spawning and importing torch cost more
    than a tiny run on this machine); the group stays up between them."""
    return [mp_run(rank, world, s) for s in specs]
