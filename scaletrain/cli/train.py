"""`scaletrain train`: validate, then launch N local processes or train this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scaletrain.cli.args import base_parser, split_args
from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def _parser():
    p = base_parser("train")
    p.add_argument("--nproc", type=int, default=0,
                   help="launch N local processes with torchrun (torch.distributed.run)")
    return p


def cmd_train(argv: list[str]) -> int:
    from scaletrain.checkpoint.decisions import Stop  # lazy (package note)
    from scaletrain.config.load import user_keys
    from scaletrain.parallel.world import World
    from scaletrain.train.resume_config import build_train_config
    from scaletrain.train.run_guard import make_run_dir

    args, overrides = split_args(_parser(), argv)
    if args.nproc < 0:
        raise UserError(f"--nproc must be a number of processes >= 1 (0 or omitted: one "
                        f"process), got {args.nproc}")
    # Validate everything before any compute; a resume's base is the run's config.toml,
    # and a run.dir training must not use is refused here (train/run_guard.py).
    # This process's place in the world, read once (parallel/world.py); a launcher judges
    # the config on the world it is about to start, exactly as each of its ranks will.
    here = World.from_env()
    launch = args.nproc > 1 and not here.launched
    world = World.launching(args.nproc) if launch else here
    writes_run_dir = world.is_main
    cfg = build_train_config(args.config, overrides, guard=writes_run_dir)
    dims = _preflight(cfg, world, user_keys(args.config, overrides))
    if writes_run_dir:  # every check passed: only now may the run dir appear (or fail to)
        make_run_dir(Path(cfg.run.dir))
    if launch:
        return _launch(cfg, args.nproc, argv)
    summary = _train_here(cfg, world, dims)
    if isinstance(summary, Stop):  # SIGTERM/SIGINT: checkpoint saved; 128 + N, as a shell
        return summary.exit_code
    if world.is_main:
        print(_done_line(summary, cfg.run.dir))
    if world.size > 1:
        # Everything is written and the process group destroyed. Skip the interpreter's
        # teardown: gloo worker threads can still hold async work (pipeline P2P) whose
        # destruction during finalization aborts the process ("terminate called without
        # an active exception", seen ~1 run in 12; pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _launch(cfg, nproc: int, argv: list[str]) -> int:
    """The launcher's part, after every check: what the ranks must not each redo, then
    torchrun with `nproc` processes running this same command."""
    if cfg.parallel.mode == "ps":  # a PS resume the config cannot load: one line here
        from scaletrain.paramserver.checkpoint import check_resume  # lazy (package note)

        check_resume(cfg)
    if cfg.plan.auto and cfg.plan.memory_gib <= 0:  # one reading for all ranks
        from scaletrain.plan.auto import GiB, budget_bytes, device_type_of  # lazy

        gib = budget_bytes(cfg, device_type_of(cfg), nproc) / GiB
        argv = [*argv, f"--plan.memory_gib={gib:.3f}"]
    return _launch_torchrun(nproc, argv)


def _train_here(cfg, world, dims):
    """This process's training (a rank, or the only process): the summary, or the `Stop`
    of a SIGTERM/SIGINT (its checkpoint saved)."""
    from scaletrain.train.trainer import train  # lazy (package note)

    if cfg.parallel.mode == "ps":  # parameter-server training is its own mode
        from scaletrain.paramserver import train_ps  # lazy: torch.distributed.rpc

        return train_ps(cfg)
    return train(cfg, world, dims)


def _done_line(summary: dict, run_dir: str) -> str:
    """The main rank's last line: steps, val / test loss (accuracy), tokens/s, where."""
    val, test = summary["val"], summary.get("test")
    line = f"done: {summary['steps']} steps, val loss {val['loss']:.4f}"
    if test:
        line += f", test loss {test['loss']:.4f}"
        if "accuracy" in test:
            line += f", test accuracy {test['accuracy']:.4f}"
    return line + f", {summary['tokens_per_s']:.0f} tokens/s -> {run_dir}"


def _preflight(cfg, world, user_set: frozenset[str]):
    """What the world (parallel/world.py `World`: the one about to be launched, or this
    rank's) and the machine's memory allow, judged before the launch or any allocation:
    one line here, not the same line from N ranks and torchrun's report.
    `user_set`: the keys the user set, which init.from must not silently replace.
    Returns the run's ParallelDims, resolved here once (None in parameter-server mode)."""
    import copy

    from scaletrain.config.paths import check_dir_field  # lazy (package note)
    from scaletrain.data.tokenizer import Tokenizer
    from scaletrain.finetune import resolve_init
    from scaletrain.finetune.source_shapes import check_source_shapes
    from scaletrain.train.run_guard import resumes_in_place
    from scaletrain.parallel.world_checks import check_world
    from scaletrain.plan.preflight import check_memory
    from scaletrain.metrics.trackers import check_trackers

    check_dir_field("data.prepared_dir", cfg.data.prepared_dir)  # rank 0 would fail alone
    resuming = resumes_in_place(cfg)
    shaped = resolve_init(copy.deepcopy(cfg), user_set,  # init.from fixes the shape
                          resuming=resuming)
    if not resuming:  # its weights have that shape (headers only; a resume reads none)
        check_source_shapes(shaped)
    if shaped.data.tokenizer:  # readable, and its special tokens agree with its directory's
        Tokenizer.load(shaped.data.tokenizer)
    if shaped.data.format == "chat":  # a chat template to render with, before launching
        from scaletrain.data.chat import load_chat_tokenizer  # lazy: imports transformers

        load_chat_tokenizer(shaped.data.tokenizer, shaped.data.chat_template)
    dims = check_world(shaped, world.size, shaped.model.vocab_size or None)  # its layout
    check_memory(shaped, dims, world.local_size)
    if world.is_main:  # only the main rank reports to the trackers
        check_trackers(cfg.metrics)
    return dims


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torch.distributed.run with N local processes."""
    rest = [a for i, a in enumerate(argv) if not a.startswith("--nproc")
            and not (i > 0 and argv[i - 1] == "--nproc")]
    cmd = [sys.executable, "-m", "scaletrain.parallel.launch", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "scaletrain", "train", *rest]
    import signal

    child = subprocess.Popen(cmd)

    # A SIGTERM to this launcher (a scheduler's stop) must reach the ranks, which save and
    # exit (checkpoint.on_signal); dying at once would orphan torchrun and lose the save.
    # Ctrl-C already reaches the whole foreground process group, so SIGINT is only ignored.
    def forward(signum, _frame):
        if signum != signal.SIGINT:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc = child.wait()
    return 128 - rc if rc < 0 else rc
