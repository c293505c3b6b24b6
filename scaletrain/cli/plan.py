"""`scaletrain plan`: layout and memory per rank of a config on --world N ranks."""

from __future__ import annotations

import json
import math

from scaletrain.cli.args import at_least, base_parser, count, split_args
from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def _parser():
    p = base_parser("plan")
    p.add_argument("--world", type=count, default=1, help="number of ranks")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--fit", action="store_true", help="search the cheapest micro-batch / "
                   "checkpointing / offload / precision / optimizer that fits; print "
                   "them as --section.key=value lines (exit 2 if nothing fits)")
    p.add_argument("--memory-gib", type=float, default=None, help="memory per rank, GiB: "
                   "plan says whether each rank fits; --fit searches under it (default: "
                   "plan.memory_gib, else for --fit 90%% of what is available)")
    return p


def cmd_plan(argv: list[str]) -> int:
    """`scaletrain plan --config F --world N [--fit [--memory-gib G]]`: plan/report.py
    (layout, bytes, predicted peak) and plan/fit.py (the search)."""
    from scaletrain.config import build_config  # lazy (package note)
    from scaletrain.plan.report import format_plan, plan
    from scaletrain.parallel.world_checks import check_world
    from scaletrain.models.registry import spec_of
    from scaletrain.plan.auto import device_type_of, plan_vocab
    from scaletrain.plan.cli import run_fit

    args, overrides = split_args(_parser(), argv)
    at_least("plan --world", args.world, 1)
    if args.memory_gib is not None and not (math.isfinite(args.memory_gib)
                                            and args.memory_gib > 0):
        raise UserError(f"plan --memory-gib must be a number of GiB > 0 (omit it to use "
                        f"plan.memory_gib or what is available), got {args.memory_gib}")
    cfg = build_config(args.config, overrides)
    if spec_of(cfg.model).activation_block is None:  # plan/activations.py measures blocks
        raise UserError(f"model.name='{cfg.model.name}' has no transformer blocks to "
                        "plan the memory of; plan covers the text families")
    vocab = plan_vocab(cfg)
    dims = check_world(cfg, args.world, vocab)  # the rules train --nproc N judges by
    if dims is None:  # parallel.mode='ps' has no layout; the plan shows its degrees'
        from scaletrain.config.dims import resolve_dims  # lazy (package note)

        dims = resolve_dims(cfg.parallel, args.world)
    if args.fit:
        return run_fit(cfg, dims, vocab, args.memory_gib or 0.0, as_json=args.json)
    result = plan(cfg, dims, vocab, device_type_of(cfg))
    gib = args.memory_gib or cfg.plan.memory_gib
    if gib > 0:  # the device's memory was given: say whether every rank fits in it
        peak = max(r["peak_bytes"] for r in result["ranks"]) / 2 ** 30
        result["memory_gib"], result["fits"] = gib, peak <= gib
    print(json.dumps(result) if args.json else format_plan(result))
    return 0
