"""`scaletrain export` (a run's model as safetensors or Hugging Face) and
`scaletrain compress` (prune / quantize a run, with a report)."""

from __future__ import annotations

from scaletrain.cli.args import base_parser, run_dir_of, split_args

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def cmd_export(argv: list[str]) -> int:
    from scaletrain.checkpoint.export import main as export_main  # lazy (package note)

    return export_main(argv)


def cmd_compress(argv: list[str]) -> int:
    from scaletrain.compress.pipeline import compress  # lazy (package note)

    args, overrides = split_args(base_parser("compress", run_dir=True), argv)
    report = compress(run_dir_of(args, overrides), overrides)
    print(report["table"])
    print(f"artefacts, report.json and report.png -> {report['out']}")
    return 0
