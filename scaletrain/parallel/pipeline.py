"""Pipeline parallelism with `torch.distributed.pipelining`: stage split and schedules.

A stage is the full model built on meta with the blocks it does not own *deleted* from
the `blocks` ModuleDict and the family's first-stage modules (GPT: wte/wpe; all but the
first stage) or last-stage modules (GPT: ln_f/lm_head; all but the last) set to None, per
its `PipelineSplit` (models/contract.py); the forward passes through what is missing, so
a middle stage maps hidden states (B, T, D) -> (B, T, D). Blocks keep their names ("blocks.7"), so
seeded init and checkpoint keys are those of the whole model (torchtitan
`pipeline_llama_manual_split`).

Schedules (torch.distributed.pipelining.schedules), p stages, m micro-batches:
- gpipe (Huang et al. 2019): all m forwards, then all m backwards; activations of m
  micro-batches alive; bubble (p-1)/(m+p-1) of the step.
- 1f1b (PipeDream-flush, Narayanan et al. 2021): after a warm-up of p-1 forwards,
  alternate one forward and one backward; same bubble, at most p micro-batches of
  activations alive.
- interleaved-1f1b (Narayanan et al. 2021 §2.2): v stages per rank (stage s on rank
  s mod p), bubble (p-1)/(v·m+p-1), more point-to-point messages.

Loss: computed on the last stage per micro-batch as the *sum* cross-entropy divided by the
global target count of the whole step (set before each step), so summing micro-batch
gradients is exactly the one-big-batch gradient (train/step.py); the schedule must then
not rescale (`scale_grads=False`).
"""

from __future__ import annotations

import torch.nn as nn

from scaletrain.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def stages_per_rank(pcfg) -> int:
    return pcfg.pp_virtual if pcfg.pp_schedule == "interleaved-1f1b" else 1


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a step's time for p stages (ranks), m micro-batches, assuming
    equal stage times and backward = 2 x forward (Narayanan et al. 2021 §2.2)."""
    if p <= 1:
        return 0.0
    v = v if schedule == "interleaved-1f1b" else 1
    return (p - 1) / (v * m + p - 1)


def split_bounds(n_layer: int, n_stages: int, manual: str = "") -> list[tuple[int, int]]:
    """[start, end) block ranges of each stage; ConfigError naming what does not fit.

    `manual`: comma-separated indices where stages 1.. start (parallel.pp_split_points).
    """
    if manual.strip():
        try:
            starts = [int(s) for s in manual.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"parallel.pp_split_points={manual!r} must be comma-separated "
                              "block indices") from None
        if len(starts) != n_stages - 1:
            raise ConfigError(f"parallel.pp_split_points={manual!r} gives {len(starts) + 1} "
                              f"stages but the pipeline has {n_stages} (pp x virtual stages)")
        edges = [0, *starts, n_layer]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ConfigError(f"parallel.pp_split_points={manual!r} must be strictly "
                              f"increasing block indices in 1..{n_layer - 1}")
        return list(zip(edges, edges[1:]))
    if n_layer % n_stages:
        raise ConfigError(f"the pipeline's {n_stages} stages (parallel.pp x pp_virtual for "
                          f"interleaved) must divide model.n_layer={n_layer}; or set "
                          "parallel.pp_split_points")
    k = n_layer // n_stages
    return [(i * k, (i + 1) * k) for i in range(n_stages)]


def check_pp(pcfg, n_layer: int, microbatches: int) -> None:
    """ConfigError for a pipeline that cannot run (before any allocation)."""
    if pcfg.pp <= 1:
        return
    n_stages = pcfg.pp * stages_per_rank(pcfg)
    split_bounds(n_layer, n_stages, pcfg.pp_split_points)
    if microbatches < pcfg.pp:
        raise ConfigError(f"parallel.pp_microbatches={microbatches} must be >= "
                          f"parallel.pp={pcfg.pp} stages (fewer micro-batches than stages "
                          "leaves stages idle; set parallel.pp_microbatches or a smaller "
                          "train.micro_batch_size)")
    if pcfg.pp_schedule == "interleaved-1f1b" and microbatches % pcfg.pp:
        raise ConfigError(f"parallel.pp_schedule='interleaved-1f1b' needs "
                          f"parallel.pp_microbatches={microbatches} to be a multiple of "
                          f"parallel.pp={pcfg.pp}")


def stage_ids(pp_rank: int, pp: int, v: int) -> list[int]:
    """Stage indices held by pipeline rank `pp_rank`: r, r+p, r+2p, ... (looped)."""
    return [pp_rank + i * pp for i in range(v)]


def prune_to_stage(model: nn.Module, split, bounds: tuple[int, int], first: bool,
                   last: bool) -> nn.Module:
    """Delete what stage [start, end) does not own (in place; model on meta);
    `split`: the family's PipelineSplit."""
    start, end = bounds
    for name in list(model.blocks.keys()):
        if not start <= int(name) < end:
            del model.blocks[name]
    drop_ends(model, split, first, last)
    return model


def drop_ends(module: nn.Module, split, first: bool, last: bool) -> None:
    """Set the first-stage modules (unless `first`) and the last-stage ones (unless
    `last`) to None."""
    for name in (() if first else split.first) + (() if last else split.last):
        setattr(module, name, None)


def build_schedule(stage_modules: list[nn.Module], ids: list[int], n_stages: int,
                   microbatches: int, kind: str, loss_fn, device, pp_group, io: dict):
    """The torch pipelining schedule over this rank's stages.

    `io`: {"tokens": (mb, T) int64, "hidden": (mb, T, D), "logits": (mb, T, V)} example
    meta tensors. Giving every stage its input/output shapes selects the *static* mode:
    no metadata is exchanged at the first step (the dynamic inference runs the stage on
    meta tensors, which DTensor/TP collectives do not support).
    """
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)

    def args(s):
        inp = io["tokens"] if s == 0 else io["hidden"]
        out = io["logits"] if s == n_stages - 1 else io["hidden"]
        last = s == n_stages - 1
        return {"input_args": inp, "output_args": out,
                "input_grads": None if s == 0 else io["hidden"],
                "output_grads": None if last else io["hidden"]}

    stages = [PipelineStage(m, s, n_stages, device, group=pp_group,
                            **(args(s) if io.get("static") else {}))
              for m, s in zip(stage_modules, ids)]
    if kind == "interleaved-1f1b":
        return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn,
                                       scale_grads=False)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind]
    return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
