"""What prepare's processes import (issue 16): the modules a datatrove worker unpickles
its steps from load no torch, matplotlib, jinja2 or transformers (each worker paid
seconds for them through the data package's `__init__`), and a text `prepare` loads no
torch. A fresh interpreter, since pytest's own process has them all loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "matplotlib", "jinja2", "transformers")


def loaded_after(*modules: str) -> list[str]:
    code = (f"import sys\nfor m in {list(modules)!r}: __import__(m)\n"
            f"print(__import__('json').dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_worker_modules_are_light():
    # dt_steps: the steps and QuietExecutor; filters: the quality filters' steps.
    assert loaded_after("scaletrain.data.dt_steps", "scaletrain.data.filters") == []


def test_text_prepare_loads_no_torch():
    # What `scaletrain prepare` imports for a text source (cli.cmd_prepare).
    heavy = loaded_after("scaletrain.cli", "scaletrain.config", "scaletrain.data.pipeline",
                         "scaletrain.data.prepare")
    assert "torch" not in heavy
