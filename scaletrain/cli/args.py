"""Command-line pieces every command shares: integer options, bounds, the parser, and
the split of `--section.key=value` overrides from a command's own options."""

from __future__ import annotations

import argparse
import math

from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def count(text: str) -> int:
    """An integer option, also written 1e3 (as config integers may be)."""
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if value.is_integer():
            return int(value)
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def at_least(option: str, value: float, low: float) -> None:
    """UserError naming the option when `value` is below `low` (or not finite)."""
    if not (math.isfinite(value) and value >= low):
        raise UserError(f"{option} must be >= {low:g}, got {value}")


def base_parser(cmd: str, *, run_dir: bool = False) -> argparse.ArgumentParser:
    """`scaletrain CMD`'s parser with the options every command has; `run_dir`: the
    optional run or artefact directory argument (eval, generate, compress, serve)."""
    p = argparse.ArgumentParser(prog=f"scaletrain {cmd}", add_help=True)
    p.add_argument("--config", help="a TOML config file (see configs/)")
    if run_dir:
        p.add_argument("run_dir", nargs="?", help="run directory (default: --run.dir)")
    return p


def split_args(parser: argparse.ArgumentParser, argv: list[str]):
    """(the command's own options, the `--section.key=value` config overrides)."""
    from scaletrain.config import parse_overrides  # lazy (package note)

    overrides, rest = parse_overrides(argv)
    args = parser.parse_args(rest)
    return args, overrides


def run_dir_of(args, overrides):
    """The directory a command works on: its argument, else the config's run.dir."""
    from scaletrain.config import build_config  # lazy (package note)

    run_dir = args.run_dir
    if run_dir is None:
        cfg = build_config(args.config, overrides)
        run_dir = cfg.run.dir
    return run_dir
