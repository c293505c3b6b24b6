"""`scaletrain <command>`: train | prepare | eval | generate | serve | compress | export |
plan | bench, one module per command (or pair of commands) in this package; here the
usage, the command table and `main`, which maps user errors to exit code 2.

Exit codes (DESIGN.md §3): 0 done; 2 the user's mistake, reported as one line naming the
field or file, no traceback; 1 an internal error (with its traceback).
"""

from __future__ import annotations

import errno
import sys

from scaletrain.cli.bench import cmd_bench
from scaletrain.cli.eval import cmd_eval
from scaletrain.cli.export import cmd_compress, cmd_export
from scaletrain.cli.generate import cmd_generate, cmd_serve
from scaletrain.cli.plan import cmd_plan
from scaletrain.cli.prepare import cmd_prepare
from scaletrain.cli.train import cmd_train
from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (tests/unit/test_layers.py): most of them pull in torch (seconds),
# and `--help`, a mistyped command or a config mistake must answer at once (exit 2). The
# command modules above import only the standard library and scaletrain.errors at the top.

USAGE = """scaletrain <command> [--config FILE.toml] [--section.key=value ...]

commands:
  train      train a model (--nproc N launches N local processes through torchrun)
  prepare    prepare (clean, dedup, split, tokenize) the data of a config
  eval       evaluate a run directory on a split (--split val|test)
  generate   sample text from a run or artefact directory (--generate.prompt=..., ...)
  compress   prune / quantize a run (--prune.method=..., --quant.methods=...) + report
  serve      HTTP completion server over a run or artefact (--serve.port=...)
  export     a run's model as safetensors or a Hugging Face GPT-2 (--format hf)
  plan       layout and memory per rank of a config on --world N ranks (nothing allocated)
  bench      peak GEMM, tokens/s, MFU, step-time breakdown and the hand-written loop

--help-config lists every config field with its default and documentation.
"""


COMMANDS = {"train": cmd_train, "prepare": cmd_prepare, "eval": cmd_eval,
            "generate": cmd_generate, "plan": cmd_plan, "compress": cmd_compress,
            "serve": cmd_serve, "export": cmd_export, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--help-config":
        from scaletrain.config.load import describe  # lazy (package note)

        print(describe())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        print(f"scaletrain: unknown command '{cmd}'{hint}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except UserError as e:
        print(f"scaletrain {cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # The machine's disk, not a bug: one line (metrics, summary, config writes).
        where = f" writing {e.filename}" if e.filename else ""
        print(f"scaletrain {cmd}: error: {e.strerror}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scaletrain {cmd}: interrupted", file=sys.stderr)
        return 130
