"""The `--fit` branch of `scaletrain plan` (cli.py cmd_plan)."""

from __future__ import annotations

import json

from scaletrain.plan.auto import GiB, budget_bytes, device_type_of
from scaletrain.plan.fit import fit


def run_fit(cfg, dims, vocab: int, memory_gib: float, as_json: bool = False) -> int:
    """Print the chosen overrides (one `--section.key=value` per line) and the predicted
    peak on the layout `dims` (ParallelDims of `plan --world N`); plan/fit.py NothingFits
    (a ConfigError: one line, exit 2) when nothing fits."""
    world = dims.world
    device_type = device_type_of(cfg)
    budget = memory_gib * GiB if memory_gib > 0 else budget_bytes(cfg, device_type, world)
    choice = fit(cfg, dims, vocab, budget, device_type)
    if as_json:
        print(json.dumps({"overrides": choice.overrides, "args": choice.lines(),
                          "predicted_peak_bytes": choice.peak_bytes,
                          "budget_bytes": budget, "predicted_slowdown": choice.cost}))
        return 0
    for line in choice.lines():
        print(line)
    print(f"# predicted peak {choice.peak_bytes / GiB:.2f} GiB per rank of "
          f"{budget / GiB:.2f} GiB ({device_type}, {world} rank{'s' * (world > 1)}); "
          f"predicted slow-down +{100 * choice.cost:.0f}%"
          + ("" if choice.overrides else "; the config fits as it is"))
    return 0
