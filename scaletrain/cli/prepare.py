"""`scaletrain prepare`: clean, dedup, split and tokenize the data of a config."""

from __future__ import annotations

import json
import sys

from scaletrain.cli.args import base_parser, split_args

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def cmd_prepare(argv: list[str]) -> int:
    from scaletrain.config import build_config  # lazy (package note)
    from scaletrain.data.pipeline import stage_table
    from scaletrain.data.prepare import prepare

    args, overrides = split_args(base_parser("prepare"), argv)
    cfg = build_config(args.config, overrides)
    if cfg.train.objective == "dpo":  # preference records (data/preference.py)
        # Only here: preference.py imports torch (seconds under load), which a text
        # `prepare` never needs.
        from scaletrain.data.preference import prepare_preference, preference_keys

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
    from scaletrain.data.mixture_prepare import prepare_mixture  # lazy (package note)

    mix = prepare_mixture(cfg.data, progress=sys.stderr.isatty())
    print(f"prepared a mixture of {len(mix.paths)} sources, tokenizer {mix.tokenizer}")
    for name, w, path in zip(mix.names, mix.weights, mix.paths):
        splits = json.loads((path / "manifest.json").read_text())["splits"]
        print(f"  {name} (weight {w:g}) -> {path}: "
              + ", ".join(f"{s} {v['tokens']} tokens" for s, v in splits.items()))
    return 0
