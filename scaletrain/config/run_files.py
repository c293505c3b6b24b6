"""The files of a run directory (DESIGN.md §3) that other commands open: their names,
atomic text writes, and which trained weights a run holds.

Kept at the bottom of the package order (beside the config they hold) so that every
layer can name a run's files: evaluation, init.from, checkpoints, compression, the
trainer. Writing and loading the weights themselves is checkpoint/run_model.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from scaletrain.errors import CheckpointError

CONFIG_FILE = "config.toml"
FINAL_WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pick_weights(run_dir: Path, which: str = "best") -> Path:
    """The best-validation weights if asked and present, else the final ones."""
    for name in ([BEST_WEIGHTS, FINAL_WEIGHTS] if which == "best" else [FINAL_WEIGHTS]):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"'{run_dir}' holds no trained weights ({FINAL_WEIGHTS}); "
                          "has the run finished?")
