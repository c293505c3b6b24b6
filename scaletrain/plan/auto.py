"""Memory detection and `train --plan.auto=true`: run the --fit search at start-up and
apply its overrides before anything is built.

Memory per rank: `plan.memory_gib` if > 0; else on a GPU the device's free memory
(`torch.cuda.mem_get_info`), on a CPU /proc/meminfo's MemAvailable plus this process's own
resident set (the prediction counts the process baseline, which this process already
holds) divided by the ranks on this machine (the world's local size) — times 0.9
(plan/fit.py DETECTED_FRACTION).

Several ranks must choose the same overrides, and each would read a slightly different
MemAvailable: `scaletrain train --nproc N` therefore detects once in the launcher and
passes `--plan.memory_gib` to the ranks (cli/train.py); under an external torchrun with more
than one rank, plan.memory_gib must be set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.metrics.meters import MiB, current_rss_mb
from scaletrain.plan.fit import DETECTED_FRACTION, apply_overrides, fit

GiB = 2 ** 30


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes (the kernel's estimate of what can be
    allocated without swapping; proc(5))."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable not in /proc/meminfo")


def detect_memory(device_type: str, local_world: int = 1) -> float:
    """Bytes one rank may use, before the 0.9 headroom (module doc)."""
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return float(free)

    return (mem_available_bytes() + current_rss_mb() * MiB) / max(1, local_world)


def device_type_of(cfg) -> str:
    """'cuda' or 'cpu' as the trainer will pick it (train.device)."""
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def budget_bytes(cfg, device_type: str, local_world: int = 1) -> float:
    """The per-rank budget the search fits under (module doc)."""
    if cfg.plan.memory_gib > 0:
        return cfg.plan.memory_gib * GiB
    return DETECTED_FRACTION * detect_memory(device_type, local_world)


def plan_vocab(cfg) -> int:
    """The vocabulary the plan assumes: model.vocab_size, else data.vocab_size (the BPE's
    size; a byte-level or smaller trained vocabulary only lowers the real peak)."""
    vocab = cfg.model.vocab_size or getattr(cfg.data, "vocab_size", 0)
    if not vocab:
        raise ConfigError("plan needs the vocabulary size: set model.vocab_size (or "
                          "data.vocab_size)")
    return vocab


def auto_plan(cfg, world, dims):
    """(cfg with the chosen overrides applied, the record logged) when plan.auto, else
    (cfg, None). Raises plan/fit.py NothingFits (exit 2) when nothing fits.

    `world`: this process's place in the world (parallel/world.py `World`); `dims`: the
    run's resolved layout (ParallelDims), which the overrides never change."""
    if not cfg.plan.auto:
        return cfg, None

    if world.size > 1 and cfg.plan.memory_gib <= 0:
        raise ConfigError("plan.auto with several ranks needs plan.memory_gib (every rank "
                          "must choose the same overrides); `--nproc N` sets it")
    device_type = device_type_of(cfg)
    budget = budget_bytes(cfg, device_type, world.local_size)
    choice = fit(cfg, dims, plan_vocab(cfg), budget, device_type)
    record = {"overrides": choice.overrides, "args": choice.lines(),
              "predicted_peak_mib": choice.peak_bytes / 2 ** 20,
              "budget_mib": budget / 2 ** 20, "predicted_slowdown": choice.cost,
              "device": device_type, "world": world.size}
    if world.is_main:
        print("plan.auto: " + (" ".join(choice.lines()) or "no change") +
              f" (predicted peak {record['predicted_peak_mib']:,.0f} MiB of "
              f"{record['budget_mib']:,.0f} MiB per rank)", file=sys.stderr, flush=True)
    return apply_overrides(cfg, choice.overrides), record


def write_record(run_dir: str | os.PathLike, record: dict | None, is_main: bool) -> None:
    """plan.json in the run directory (rank 0 only: `is_main`)."""
    if record is None or not is_main:
        return
    path = Path(run_dir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
