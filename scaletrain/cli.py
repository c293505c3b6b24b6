"""`scaletrain <command>`: train | prepare | eval | generate.

Exit codes (DESIGN.md §3): 0 done; 2 the user's mistake, reported as one line naming the
field or file, no traceback; 1 an internal error (with its traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (tests/unit/test_layers.py): most of them pull in torch (seconds),
# and `--help`, a mistyped command or a config mistake must answer at once (exit 2).

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


def _count(text: str) -> int:
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


def _at_least(option: str, value: float, low: float) -> None:
    """UserError naming the option when `value` is below `low` (or not finite)."""
    if not (math.isfinite(value) and value >= low):
        raise UserError(f"{option} must be >= {low:g}, got {value}")


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"scaletrain {cmd}", add_help=True)
    p.add_argument("--config", help="a TOML config file (see configs/)")
    if cmd == "train":
        p.add_argument("--nproc", type=int, default=0,
                       help="launch N local processes with torchrun (torch.distributed.run)")
    if cmd in ("eval", "generate", "compress", "serve"):
        p.add_argument("run_dir", nargs="?", help="run directory (default: --run.dir)")
    if cmd == "plan":
        p.add_argument("--world", type=_count, default=1, help="number of ranks")
        p.add_argument("--json", action="store_true", help="print the plan as JSON")
        p.add_argument("--fit", action="store_true", help="search the cheapest micro-batch / "
                       "checkpointing / offload / precision / optimizer that fits; print "
                       "them as --section.key=value lines (exit 2 if nothing fits)")
        p.add_argument("--memory-gib", type=float, default=None, help="memory per rank, GiB: "
                       "plan says whether each rank fits; --fit searches under it (default: "
                       "plan.memory_gib, else for --fit 90%% of what is available)")
    if cmd == "bench":
        p.add_argument("--out", help="folder for bench.json / bench.png "
                       "(default: <run.dir>/bench)")
        p.add_argument("--steps", type=_count, default=5, help="timed steps")
        p.add_argument("--warmup", type=_count, default=2, help="untimed steps (compile)")
        p.add_argument("--pairs", type=_count, default=3, help="scaletrain/hand-loop pairs")
    if cmd == "eval":
        p.add_argument("--split", choices=("val", "test"), default="val")
        p.add_argument("--weights", choices=("best", "final"), default="best")
        p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: score "
                       "them instead of the loss (results -> DIR/lm_eval/)")
        p.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
        p.add_argument("--limit", type=_count, help="at most this many documents per task")
        p.add_argument("--num-fewshot", type=_count, help="few-shot examples (default: "
                       "each task's own)")
        p.add_argument("--batch-size", type=_count, default=8,
                       help="loglikelihood rows per forward")
    return p


def _split_args(cmd: str, argv: list[str]):
    from scaletrain.config import parse_overrides  # lazy (module note)

    overrides, rest = parse_overrides(argv)
    args = _parser(cmd).parse_args(rest)
    return args, overrides


def cmd_train(argv: list[str]) -> int:
    from scaletrain.config.load import user_keys  # lazy (module note)
    from scaletrain.parallel.world import World  # lazy (module note)
    from scaletrain.train.resume_config import build_train_config
    from scaletrain.train.run_guard import make_run_dir

    args, overrides = _split_args("train", argv)
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
        if cfg.parallel.mode == "ps":  # a PS resume the config cannot load: one line here
            from scaletrain.paramserver.checkpoint import check_resume  # lazy (module note)

            check_resume(cfg)
        if cfg.plan.auto and cfg.plan.memory_gib <= 0:  # one reading for all ranks
            from scaletrain.plan.auto import GiB, budget_bytes, device_type_of  # lazy (module note)

            gib = budget_bytes(cfg, device_type_of(cfg), args.nproc) / GiB
            argv = [*argv, f"--plan.memory_gib={gib:.3f}"]
        return _launch_torchrun(args.nproc, argv)
    from scaletrain.checkpoint.decisions import Stop  # lazy (module note)
    from scaletrain.train.trainer import train

    if cfg.parallel.mode == "ps":  # parameter-server training is its own mode
        from scaletrain.paramserver import train_ps  # lazy: torch.distributed.rpc

        summary = train_ps(cfg)
    else:
        summary = train(cfg, world, dims)
    if isinstance(summary, Stop):  # SIGTERM/SIGINT: checkpoint saved; 128 + N, as a shell
        return summary.exit_code
    if world.is_main:
        val, test = summary["val"], summary.get("test")
        line = f"done: {summary['steps']} steps, val loss {val['loss']:.4f}"
        if test:
            line += f", test loss {test['loss']:.4f}"
            if "accuracy" in test:
                line += f", test accuracy {test['accuracy']:.4f}"
        line += f", {summary['tokens_per_s']:.0f} tokens/s -> {cfg.run.dir}"
        print(line)
    if world.size > 1:
        # Everything is written and the process group destroyed. Skip the interpreter's
        # teardown: gloo worker threads can still hold async work (pipeline P2P) whose
        # destruction during finalization aborts the process ("terminate called without
        # an active exception", seen ~1 run in 12; pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _preflight(cfg, world, user_set: frozenset[str]):
    """What the world (parallel/world.py `World`: the one about to be launched, or this
    rank's) and the machine's memory allow, judged before the launch or any allocation:
    one line here, not the same line from N ranks and torchrun's report.
    `user_set`: the keys the user set, which init.from must not silently replace.
    Returns the run's ParallelDims, resolved here once (None in parameter-server mode)."""
    import copy

    from scaletrain.config.paths import check_dir_field  # lazy (module note)
    from scaletrain.finetune import resolve_init
    from scaletrain.train.run_guard import resumes_in_place
    from scaletrain.parallel.world_checks import check_world
    from scaletrain.plan.preflight import check_memory
    from scaletrain.metrics.trackers import check_trackers

    check_dir_field("data.prepared_dir", cfg.data.prepared_dir)  # rank 0 would fail alone
    shaped = resolve_init(copy.deepcopy(cfg), user_set,  # init.from fixes the shape
                          resuming=resumes_in_place(cfg))
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


def cmd_prepare(argv: list[str]) -> int:
    from scaletrain.config import build_config  # lazy (module note)
    from scaletrain.data.pipeline import stage_table
    from scaletrain.data.preference import prepare_preference, preference_keys
    from scaletrain.data.prepare import prepare

    args, overrides = _split_args("prepare", argv)
    cfg = build_config(args.config, overrides)
    if cfg.train.objective == "dpo":  # preference records (data/preference.py)
        path = prepare_preference(cfg.data, preference_keys(cfg.dpo),
                                  progress=sys.stderr.isatty())
    elif cfg.data.mixture:
        return _prepare_mixture(cfg)
    else:
        path = prepare(cfg.data, progress=sys.stderr.isatty())
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"prepared {cfg.data.source} -> {path}")
    for split, info in manifest.get("splits", {}).items():
        print(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in info.items()
                                          if isinstance(v, (int, float))))
    for line in stage_table(manifest) if "stages" in manifest else []:  # text pipeline's
        print(line)
    if (path / "report.png").is_file():
        print(f"  report: {path / 'report.png'}")
    return 0


def _prepare_mixture(cfg) -> int:
    """`prepare` of a data.mixture: each source's directory and token counts."""
    from scaletrain.data.mixture_prepare import prepare_mixture  # lazy (module note)

    mix = prepare_mixture(cfg.data, progress=sys.stderr.isatty())
    print(f"prepared a mixture of {len(mix.paths)} sources, tokenizer {mix.tokenizer}")
    for name, w, path in zip(mix.names, mix.weights, mix.paths):
        splits = json.loads((path / "manifest.json").read_text())["splits"]
        print(f"  {name} (weight {w:g}) -> {path}: "
              + ", ".join(f"{s} {v['tokens']} tokens" for s, v in splits.items()))
    return 0


def _run_config(args, overrides):
    from scaletrain.config import build_config  # lazy (module note)

    run_dir = args.run_dir
    if run_dir is None:
        cfg = build_config(args.config, overrides)
        run_dir = cfg.run.dir
    return run_dir


def cmd_eval(argv: list[str]) -> int:
    from scaletrain.data.datasets import MixtureWindows  # lazy (module note)
    from scaletrain.data.loader import eval_batches
    from scaletrain.evaluate import covered_samples, evaluate, mixture_result
    from scaletrain.evaluate.model_data import data_for_model
    from scaletrain.models import REGISTRY
    from scaletrain.precision import PrecisionPolicy
    from scaletrain.compress.artefact import load_artefact

    args, overrides = _split_args("eval", argv)
    run_dir = _run_config(args, overrides)
    if args.tasks is not None:
        return _eval_tasks(args, overrides, run_dir)
    cfg, model, tok = load_artefact(run_dir, overrides, which=args.weights)
    if cfg.train.objective == "dpo":  # its pairs need the reference: the run scored them
        raise UserError("scaletrain eval scores the language-model loss; a DPO run's DPO "
                        "loss and accuracy are its eval records in metrics.jsonl (or pass "
                        "--train.objective=lm --data.source=TEXT)")
    # Encoded with the directory's own tokenizer, whatever the config's data says.
    data = data_for_model(cfg, run_dir, tok, dict(overrides).get("data.tokenizer", ""))
    dataset = {"val": data.val, "test": data.test}[args.split]
    if dataset is None:
        raise UserError(f"data.{args.split}_fraction is 0: the run has no {args.split} split")
    policy = PrecisionPolicy(cfg.precision.dtype, next(model.parameters()).device)
    # val: the whole split; test: the batches the run's own test loss covers (all by
    # default), so that the two agree (evaluate/evaluator.py).
    n_batches = cfg.eval.test_batches if args.split == "test" else 0
    # Documents masked as the run trained (data.document_masking), at the run's EOT.
    eot = tok.eot_id if cfg.data.document_masking and tok is not None else None
    parts = {"": dataset} if not isinstance(dataset, MixtureWindows) else \
        dict(zip(dataset.names, dataset.parts))  # a mixture: each source, as training does
    by_source = {name: evaluate(model, eval_batches(part, cfg.eval.batch_size, n_batches),
                                policy, policy.device, REGISTRY[cfg.model.name].kind,
                                eot_id=eot) for name, part in parts.items()}
    result = by_source[""] if "" in by_source else mixture_result(by_source, dataset.weights)
    samples = sum(covered_samples(p, cfg.eval.batch_size, n_batches) for p in parts.values())
    print(json.dumps({"split": args.split, **result, "samples": samples}))
    return 0


def _eval_tasks(args, overrides, run_dir) -> int:
    """`eval --tasks`: lm-evaluation-harness tasks on the directory's model."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("eval --tasks needs lm-evaluation-harness: pip install "
                        "'scaletrain[lmeval]'")
    from scaletrain.compress.artefact import load_artefact  # lazy (module note)
    from scaletrain.config.load import to_dict
    from scaletrain.evaluate import harness
    from scaletrain.evaluate.harness_model import ScaletrainLM
    from scaletrain.metrics.trackers import check_trackers, tracker_sinks
    from scaletrain.models.registry import spec_of
    from scaletrain.precision import PrecisionPolicy

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks:
        raise UserError("--tasks: name at least one lm-eval task")
    for option, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None:
            _at_least(option, value, 1)
    if args.num_fewshot is not None:
        _at_least("--num-fewshot", args.num_fewshot, 0)
    request = harness.HarnessRequest(tasks, args.include_path, args.limit, args.num_fewshot,
                                     args.batch_size)
    manager = harness.task_manager(request)  # unknown task: one line, nothing loaded
    cfg, model, tok = load_artefact(run_dir, overrides, which=args.weights)
    if tok is None:
        raise UserError(f"'{run_dir}' is not a text model; lm-eval tasks need one")
    check_trackers(cfg.metrics)
    policy = PrecisionPolicy(cfg.precision.dtype, next(model.parameters()).device)
    lm = ScaletrainLM(model, tok, seq_len=cfg.model.seq_len, policy=policy,
                      batch_size=args.batch_size, decode=spec_of(cfg.model).decode)
    results = harness.run_tasks(lm, request, manager)
    metrics = harness.task_metrics(results)
    step = _weights_step(Path(run_dir), args.weights)
    path = harness.write_results(Path(run_dir), {
        "model_dir": str(Path(run_dir).resolve()), "weights": args.weights, "step": step,
        "tasks": list(tasks), "metrics": metrics, **results})
    if (Path(run_dir) / "config.toml").is_file():  # a run: its own tracker runs
        for sink in tracker_sinks(cfg.metrics, Path(run_dir), to_dict(cfg)):
            sink.write(harness.tracker_record(metrics, step))
            sink.close()
    for task, values in metrics.items():
        print(f"{task}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    print(f"results -> {path}")
    return 0


def _weights_step(run_dir: Path, which: str) -> int:
    """The training step the evaluated weights are from (summary.json), 0 if unknown."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return 0
    best = summary.get("best_step") if which == "best" else None
    return int(best if best is not None else summary.get("steps", 0) or 0)


def cmd_generate(argv: list[str]) -> int:
    import torch

    from scaletrain.compress.artefact import load_artefact
    from scaletrain.generate import sample
    from scaletrain.models.registry import spec_of

    args, overrides = _split_args("generate", argv)
    run_dir = _run_config(args, overrides)
    cfg, model, tok = load_artefact(run_dir, overrides)  # run, artefact or HF dir
    if tok is None:
        raise UserError(f"'{run_dir}' is not a text model run; generate needs a text model")
    g = cfg.generate
    gen = torch.Generator().manual_seed(g.seed)
    prompt = tok.encode(g.prompt)
    if not prompt:
        raise UserError("generate.prompt must not be empty")
    for i in range(g.num_samples):
        new = sample(model, prompt, max_new_tokens=g.max_new_tokens, seq_len=cfg.model.seq_len,
                     temperature=g.temperature, top_k=g.top_k, generator=gen,
                     stop_id=tok.eot_id, decode=spec_of(cfg.model).decode)
        print(f"--- sample {i + 1} ---")
        print(g.prompt + tok.decode(new))
    return 0


def cmd_compress(argv: list[str]) -> int:
    from scaletrain.compress.pipeline import compress  # lazy (module note)

    args, overrides = _split_args("compress", argv)
    report = compress(_run_config(args, overrides), overrides)
    print(report["table"])
    print(f"artefacts, report.json and report.png -> {report['out']}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    from scaletrain.serve.server import serve  # lazy (module note)

    args, overrides = _split_args("serve", argv)
    serve(_run_config(args, overrides), overrides)
    return 0


def cmd_export(argv: list[str]) -> int:
    from scaletrain.checkpoint.export import main as export_main  # lazy (module note)

    return export_main(argv)


def cmd_plan(argv: list[str]) -> int:
    """`scaletrain plan --config F --world N [--fit [--memory-gib G]]`: plan/report.py
    (layout, bytes, predicted peak) and plan/fit.py (the search)."""
    from scaletrain.config import build_config  # lazy (module note)
    from scaletrain.plan.report import format_plan, plan
    from scaletrain.parallel.world_checks import check_world
    from scaletrain.models.registry import spec_of
    from scaletrain.plan.auto import device_type_of, plan_vocab
    from scaletrain.plan.cli import run_fit

    args, overrides = _split_args("plan", argv)
    _at_least("plan --world", args.world, 1)
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
        from scaletrain.config.dims import resolve_dims  # lazy (module note)

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


def cmd_bench(argv: list[str]) -> int:
    """`scaletrain bench --config F [--out DIR]`: bench/report.py."""
    from scaletrain.bench.report import bench_command  # lazy (module note)
    from scaletrain.config import build_config
    from scaletrain.parallel.world import World
    from scaletrain.parallel.world_checks import check_world

    args, overrides = _split_args("bench", argv)
    _at_least("bench --steps", args.steps, 1)
    _at_least("bench --warmup", args.warmup, 0)
    _at_least("bench --pairs", args.pairs, 1)
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


COMMANDS = {"train": cmd_train, "prepare": cmd_prepare, "eval": cmd_eval,
            "generate": cmd_generate, "plan": cmd_plan, "compress": cmd_compress, "serve": cmd_serve,
            "export": cmd_export, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--help-config":
        from scaletrain.config.load import describe  # lazy (module note)

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


if __name__ == "__main__":
    sys.exit(main())
