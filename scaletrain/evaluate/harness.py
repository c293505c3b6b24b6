"""`scaletrain eval DIR --tasks=…`: lm-evaluation-harness tasks scored on a run, a
checkpoint, an artefact or an HF directory, through the harness's Python API
(`lm_eval.simple_evaluate` with the model wrapper of harness_model.py).

The task names are checked against the harness's task index (its own tasks and those of
`--include-path`, a folder of task YAML files) before any model is loaded: an unknown
name is one line with the near names. Results go to `<DIR>/lm_eval/results-<time>.json`
(a new file per call: nothing earlier is overwritten) and, when the run's `[metrics]`
names a tracker, into the run's tracker run (trackers.json: the training's own MLflow /
W&B run) as one record of kind "lm_eval" at the step the weights come from.
"""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from scaletrain.errors import ConfigError

RESULTS_DIR = "lm_eval"


@dataclass(frozen=True)
class HarnessRequest:
    """What `scaletrain eval --tasks` asks of the harness (the command line's flags)."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    limit: int | None = None        # documents per task (None = all)
    num_fewshot: int | None = None  # None = each task's own default
    batch_size: int = 8


def task_manager(request: HarnessRequest) -> TaskManager:
    """The harness's task index with `request`'s tasks checked (ConfigError otherwise)."""
    if request.include_path is not None and not Path(request.include_path).is_dir():
        raise ConfigError(f"--include-path: '{request.include_path}' is not a directory "
                          "of lm-eval task YAML files")
    manager = TaskManager(include_path=request.include_path)
    known = set(manager.all_tasks)
    for name in request.tasks:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else \
                " (a task of your own: --include-path=DIR of task YAML files)"
            raise ConfigError(f"--tasks: '{name}' is not an lm-eval task{hint}")
    return manager


def run_tasks(lm, request: HarnessRequest, manager: TaskManager) -> dict:
    """The harness's results dict (`results`, `versions`, `n-shot`, `config`, ...)."""
    out = lm_eval.simple_evaluate(model=lm, tasks=list(request.tasks), task_manager=manager,
                                  num_fewshot=request.num_fewshot, limit=request.limit,
                                  batch_size=request.batch_size, log_samples=False,
                                  bootstrap_iters=0)
    return {k: out[k] for k in ("results", "versions", "n-shot", "configs") if k in out}


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the numbers in the harness's `results`; its keys
    "acc,none" (metric, filter) become "acc" for the default filter, else "acc/filter"."""
    out: dict[str, dict[str, float]] = {}
    for task, fields in results["results"].items():
        for key, value in fields.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            out.setdefault(task, {})[metric if filt == "none" else f"{metric}/{filt}"] = value
    return out


def write_results(model_dir: Path, payload: dict) -> Path:
    """`<model_dir>/lm_eval/results-<UTC time>.json`, a new file (never overwritten)."""
    folder = Path(model_dir) / RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in range(1000):
        path = folder / (f"results-{stamp}.json" if n == 0 else f"results-{stamp}-{n}.json")
        try:
            with open(path, "x", encoding="utf-8") as f:  # "x": fails if it exists
                json.dump(payload, f, indent=2, default=str)
            return path
        except FileExistsError:
            continue
    raise OSError(f"{folder}: could not find a free results file name")


def tracker_record(metrics: dict[str, dict[str, float]], step: int) -> dict:
    """The record the run's trackers get: tags `lm_eval/<task>/<metric>`."""
    return {"kind": "lm_eval", "step": step, **metrics}
