"""`scaletrain eval`: a run or artefact directory's loss on a split, or lm-eval tasks."""

from __future__ import annotations

import json
from pathlib import Path

from scaletrain.cli.args import at_least, base_parser, count, run_dir_of, split_args
from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def _parser():
    p = base_parser("eval", run_dir=True)
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--weights", choices=("best", "final"), default="best")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: score "
                   "them instead of the loss (results -> DIR/lm_eval/)")
    p.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--limit", type=count, help="at most this many documents per task")
    p.add_argument("--num-fewshot", type=count, help="few-shot examples (default: "
                   "each task's own)")
    p.add_argument("--batch-size", type=count, default=8,
                   help="loglikelihood rows per forward")
    return p


def cmd_eval(argv: list[str]) -> int:
    from scaletrain.data.datasets import MixtureWindows  # lazy (package note)
    from scaletrain.data.loader import eval_batches
    from scaletrain.evaluate import covered_samples, evaluate, mixture_result
    from scaletrain.evaluate.model_data import data_for_model
    from scaletrain.models import REGISTRY
    from scaletrain.precision import PrecisionPolicy
    from scaletrain.compress.artefact import load_artefact

    args, overrides = split_args(_parser(), argv)
    run_dir = run_dir_of(args, overrides)
    if args.tasks is not None:
        return _eval_tasks(args, overrides, run_dir)
    cfg, model, tok = load_artefact(run_dir, overrides, which=args.weights)
    if cfg.train.objective == "dpo":  # its pairs need the reference: the run scored them
        raise UserError("scaletrain eval scores the language-model loss; a DPO run's DPO "
                        "loss and accuracy are its eval records in metrics.jsonl (or pass "
                        "--train.objective=lm --data.source=TEXT)")
    # Encoded with the directory's own tokenizer, whatever the config's data says.
    home, _ = _home_and_step(Path(run_dir), args.weights)
    data = data_for_model(cfg, home, tok, dict(overrides).get("data.tokenizer", ""))
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
    from scaletrain.compress.artefact import load_artefact  # lazy (package note)
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
            at_least(option, value, 1)
    if args.num_fewshot is not None:
        at_least("--num-fewshot", args.num_fewshot, 0)
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
    home, step = _home_and_step(Path(run_dir), args.weights)
    checkpoint = home != Path(run_dir)
    path = harness.write_results(home, {
        "model_dir": str(Path(run_dir).resolve()), "step": step, "tasks": list(tasks),
        "weights": "checkpoint" if checkpoint else args.weights, "metrics": metrics,
        **results})
    if (home / "config.toml").is_file():  # a run (or its checkpoint): the run's trackers
        for sink in tracker_sinks(cfg.metrics, home, to_dict(cfg)):
            sink.write(harness.tracker_record(metrics, step))
            sink.close()
    for task, values in metrics.items():
        print(f"{task}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    print(f"results -> {path}")
    return 0


def _home_and_step(model_dir: Path, which: str) -> tuple[Path, int]:
    """Where results go and the step the weights are from: a checkpoint
    RUN/checkpoints/step-N reports into its run at its own step; any other directory
    into itself, at the step of its `which` weights."""
    from scaletrain.checkpoint.export import checkpoint_run_dir  # lazy (package note)
    from scaletrain.checkpoint.manifest import MANIFEST, read_manifest

    if (model_dir / MANIFEST).is_file():
        return checkpoint_run_dir(model_dir), read_manifest(model_dir)["step"]
    return model_dir, _weights_step(model_dir, which)


def _weights_step(run_dir: Path, which: str) -> int:
    """The training step the evaluated weights are from (summary.json), 0 if unknown."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return 0
    best = summary.get("best_step") if which == "best" else None
    return int(best if best is not None else summary.get("steps", 0) or 0)
