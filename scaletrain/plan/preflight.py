"""Refuse a run whose predicted peak memory cannot fit the machine, before anything is
allocated or launched (issue 13 item 13: `--train.batch_size=1e20` grew to 24 GB over
11 minutes and was killed by the kernel).

The prediction is `scaletrain plan`'s (plan/report.py, plan/memory.py) plus the
host memory of one step's batch, which the plan leaves out because it is small for any
sane batch: the sampler's global index array (data/sampler.py: int64 per sample, built
and then concatenated) and the rank's token rows (data/datasets.py: the gathered (B, T+1)
rows, their int64 copy and the contiguous inputs and targets — four int64 arrays). That
term is what bounds an absurd batch even when the micro-batch is small.

The limit is the machine's memory, not what happens to be free: this check refuses only
what cannot fit at all (MemTotal, or the cgroup's memory.max when lower, divided by the
ranks on this machine; on a GPU the device's total memory). Fitting under what is free
is `plan --fit` / `plan.auto`'s job; with `plan.auto` the model terms are left to that
search (it refuses when nothing fits), the batch term is still checked.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.models.registry import spec_of
from scaletrain.optim.batch_rules import full_batch_size
from scaletrain.plan.report import plan
from scaletrain.plan.auto import device_type_of, plan_vocab

GiB = 2 ** 30
_CGROUP_MAX = Path("/sys/fs/cgroup/memory.max")  # cgroup v2 limit of this container


def machine_bytes(device_type: str, local_world: int = 1) -> float:
    """Memory one rank can ever have: the device's total on a GPU, else the host's
    physical memory (or the cgroup limit, if lower) over the ranks on this machine."""
    if device_type == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        limit = _CGROUP_MAX.read_text().strip()
        if limit.isdigit():
            total = min(total, float(limit))
    except OSError:
        pass
    return total / max(1, local_world)


def batch_bytes(cfg, global_batch: int, dp: int) -> float:
    """Host bytes of one step's batch on a rank (module doc)."""
    index = 2 * 8.0 * global_batch
    per_rank = global_batch / dp
    if spec_of(cfg.model).kind == "text":  # token rows; image batches are not counted
        return index + 4 * 8.0 * per_rank * (cfg.model.seq_len + 1)
    return index


def _fmt_gib(b: float) -> str:
    g = b / GiB
    if g < 1:
        return f"{b / 2 ** 20:,.0f} MiB"
    return f"{g:,.1f} GiB" if g < 1e6 else f"{g:.3g} GiB"


def check_memory(cfg, dims, local_world: int, n_train: int | None = None) -> None:
    """ConfigError naming the predicted peak when it exceeds `machine_bytes` (module doc).

    `dims`: the run's resolved layout (ParallelDims; None in parameter-server mode, which
    this check skips); `local_world`: the ranks on this machine. `n_train`: the train
    split's samples, which full-batch descent trains on per step;
    None before the data is prepared (the full-batch check then waits for the trainer).
    """
    if cfg.parallel.mode == "ps":
        return  # PS ranks are not modelled by the plan
    if cfg.train.descent == "full-batch" and n_train is None:
        return
    device_type = device_type_of(cfg)
    limit = machine_bytes(device_type, local_world)
    where = "GPU" if device_type == "cuda" else "machine"
    dp = dims.dp
    full = full_batch_size(cfg, n_train)
    need = batch_bytes(cfg, full, dp)
    if not need <= limit:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} "
                          f"(train.descent='{cfg.train.descent}'): one step's batch of "
                          f"{full:,} samples alone needs {_fmt_gib(need)} of host memory "
                          f"(sample indices and token rows), more than the "
                          f"{_fmt_gib(limit)} this machine has per rank; lower "
                          "train.batch_size")
    if spec_of(cfg.model).activation_block is None or cfg.plan.auto or full % dp:
        return  # no plan for the image families; plan.auto fits the rest itself
    sized = copy.deepcopy(cfg)
    sized.train.batch_size = full  # the batch this descent mode trains on
    if sized.train.micro_batch_size > full // dp:
        sized.train.micro_batch_size = 0
    # The tokenizer's vocabulary is not known yet; the configured one rounded up to a
    # multiple of tp bounds the memory without judging its TP split (the ranks do that).
    vocab = -(-plan_vocab(sized) // dims.tp) * dims.tp
    need += max(r["peak_bytes"] for r in plan(sized, dims, vocab, device_type)["ranks"])
    if math.isfinite(need) and need <= limit:
        return
    raise ConfigError(
        f"the predicted peak memory of this run is {_fmt_gib(need)} per rank (a step's "
        f"batch of {full:,} samples, train.micro_batch_size="
        f"{cfg.train.micro_batch_size}, train.descent='{cfg.train.descent}', "
        f"eval.batch_size={cfg.eval.batch_size}), more than "
        f"the {_fmt_gib(limit)} this {where} has per rank; `scaletrain plan --fit` finds "
        "a micro-batch, checkpointing, offload, precision and optimizer that fit")
