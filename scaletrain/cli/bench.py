"""`scaletrain bench`: peak GEMM, tokens/s, MFU, the step-time breakdown and the
hand-written loop of a config (scaletrain/bench/report.py)."""

from __future__ import annotations

from scaletrain.cli.args import at_least, base_parser, count, split_args
from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def _parser():
    p = base_parser("bench")
    p.add_argument("--out", help="folder for bench.json / bench.png "
                   "(default: <run.dir>/bench)")
    p.add_argument("--steps", type=count, default=5, help="timed steps")
    p.add_argument("--warmup", type=count, default=2, help="untimed steps (compile)")
    p.add_argument("--pairs", type=count, default=3, help="scaletrain/hand-loop pairs")
    return p


def cmd_bench(argv: list[str]) -> int:
    """`scaletrain bench --config F [--out DIR]`: bench/report.py."""
    from scaletrain.bench.report import bench_command  # lazy (package note)
    from scaletrain.config import build_config
    from scaletrain.parallel.world import World
    from scaletrain.parallel.world_checks import check_world

    args, overrides = split_args(_parser(), argv)
    at_least("bench --steps", args.steps, 1)
    at_least("bench --warmup", args.warmup, 0)
    at_least("bench --pairs", args.pairs, 1)
    cfg = build_config(args.config, overrides)
    world = World.from_env()  # one process, read once (parallel/world.py)
    # The layout, resolved once by the rules `train` judges by; handed to the trainer.
    dims = check_world(cfg, world.size, cfg.model.vocab_size or None)
    if dims is None:
        raise UserError("bench times the trainer of data/tensor/pipeline-parallel runs; "
                        "parallel.mode='ps' (the parameter-server mode) is not benched")
    bench_command(cfg, world, dims, out=args.out, steps=args.steps, warmup=args.warmup,
                  pairs=args.pairs)
    return 0
