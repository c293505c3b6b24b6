"""A small training run built from the same pieces as the trainer (DistContext,
build_parallel_model, StatefulLoader, train_step), runnable on any layout.

`train_run(rank, world, spec)` trains a tiny GPT (or spec["model"]'s family) on synthetic tokens and returns, on
every rank, the global loss of each step, the global grad norms and (rank 0) the full
parameters. One process (world=1) is the reference every layout must match.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.data.loader import StatefulLoader
from scaletrain.models.contract import param_at
from scaletrain.optim import build_optimizer
from scaletrain.optim.step_end import StepEnd
from scaletrain.parallel.context import DistContext
from scaletrain.config.dims import resolve_dims
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.parallel.weights import full_state_dict
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import IGNORE_INDEX
from scaletrain.train.step import StepOptions, split_micro_batches, train_step

V, T = 67, 16


class Tokens:
    """`n` random (x, y) windows; `masked` gives each sample a different number of
    ignored targets, so ranks (and micro-batches) hold unequal target counts."""

    def __init__(self, n: int = 64, masked: bool = False, seed: int = 0):
        g = np.random.default_rng(seed)
        self.x = g.integers(0, V, (n, T), dtype=np.int64)
        self.y = g.integers(0, V, (n, T), dtype=np.int64)
        if masked:
            keep = g.integers(1, T + 1, n)  # 1..T targets per sample
            for i, k in enumerate(keep):
                self.y[i, k:] = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx):
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


def default_spec(**kw) -> dict:
    spec = dict(dtype="fp32", steps=20, batch=8, micro=2, dp_replicate=1, dp_shard=-1,
                masked=False, ac="none", reshard=True, cpu_offload=False, optim="adamw",
                grad_clip=0.05, n_layer=2, d_model=32, assignment="block",
                local_count=False, fault=None, timeout_s=60, compile=False,
                model=())  # model: extra ModelConfig fields as (name, value) pairs
    spec.update(kw)
    return spec


def train_run(rank: int, world: int, spec: dict) -> dict:
    device = torch.device("cpu")
    pcfg = ParallelConfig(dp_replicate=spec["dp_replicate"], dp_shard=spec["dp_shard"],
                          timeout_s=spec["timeout_s"], activation_checkpoint=spec["ac"],
                          reshard_after_forward=spec["reshard"],
                          cpu_offload=spec["cpu_offload"])
    if world == 1:
        pcfg.dp_replicate, pcfg.dp_shard = 1, 1
    ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), device)
    policy = PrecisionPolicy(spec["dtype"], device)
    mcfg = ModelConfig(**{"n_layer": spec["n_layer"], "n_head": 2, "d_model": spec["d_model"],
                          "seq_len": T, **dict(spec["model"])})
    pm = build_parallel_model(mcfg, {"vocab_size": V}, seed=3, dims=ctx.dims,
                              mesh=ctx.mesh, pcfg=pcfg, policy=policy, device=device,
                              compile=spec["compile"])
    model = pm.module
    opt = build_optimizer(model, OptimConfig(name=spec["optim"], lr=1e-2))
    loader = StatefulLoader(Tokens(masked=spec["masked"]), spec["batch"], rank=rank,
                            world=ctx.dims.dp, seed=5, assignment=spec["assignment"])
    opts = StepOptions(**ctx.step_options(pm))
    end = StepEnd(grad_clip=spec["grad_clip"])
    if spec["local_count"]:  # the bug a test must catch: per-rank normalisation
        opts.count_reducer = lambda n: n
    losses, norms = [], []
    fault = spec["fault"]  # {"rank", "step", "mode": "die" | "hang"}: fault injection
    with ctx.guard():  # as the trainer: a lost peer ends this rank with one line
        for step in range(spec["steps"]):
            if fault and rank == fault["rank"] and step == fault["step"]:
                if fault["mode"] == "die":
                    os._exit(3)
                time.sleep(600)
            micro = split_micro_batches(loader.next(), spec["micro"])
            r = train_step(model, micro, opt, policy, None, opts, end=end)
            # Each rank's loss is its share of the global mean; the sum over ranks is it.
            losses.append(ctx.sum_reducer(r.loss.clone()).item())
            gn = r.grad_norm
            norms.append((gn.full_tensor() if hasattr(gn, "full_tensor") else gn).item())
    out = {"losses": losses, "norms": norms, "strategy": ctx.dims.strategy,
           # every tied (head, embedding) pair of the family is still one tensor
           "tied": all(param_at(model, h) is param_at(model, e) for h, e in pm.spec.tied)}
    params = full_state_dict(model)
    if rank == 0:
        out["params"] = {k: v.clone() for k, v in params.items()}
    # The process group stays up for the next run in this process (spawn.py ends it):
    # re-creating it on the same port races with the old store's shutdown.
    return out


if __name__ == "__main__":
    # One rank of a fault test: `python harness.py MODE` with the torchrun environment.
    import json

    r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    out = train_run(r, w, default_spec(steps=1000, dp_shard=w, timeout_s=4,
                                       fault={"rank": 1, "step": 3, "mode": sys.argv[1]}))
    print(json.dumps({"steps": len(out["losses"])}))
