"""ParallelDims are resolved once, when a run is built, and handed to everything (issue 14
item 2, DESIGN.md §6 "resolve once, pass down"): the Trainer is handed its runtime and
layout and resolves nothing itself; only validation resolves the layout in scaletrain/."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from scaletrain.config.dims import ParallelDims
from scaletrain.train.runtime import Runtime
from scaletrain.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
DIMS_LABEL = "ParallelDims resolved (`resolve_dims(` / `ParallelDims.resolve(`)"


def _arch_metrics():
    """scripts/arch_metrics.py, loaded by path (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("arch_metrics",
                                                  REPO / "scripts" / "arch_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_validation_resolves_the_layout():
    """The files of scaletrain/ that resolve ParallelDims (arch_metrics' pattern, its
    definition in config/dims.py aside): the world checks every run passes through, and
    `plan --world` of a parameter-server config, which the world checks give no layout."""
    metrics = _arch_metrics()
    pattern = metrics.PATTERNS[DIMS_LABEL]
    defined = metrics.DEFINED_IN[DIMS_LABEL]
    files = {str(f.relative_to(REPO)) for f in (REPO / "scaletrain").rglob("*.py")
             if not str(f).endswith(defined) and re.search(pattern, f.read_text())}
    assert files == {"scaletrain/parallel/world_checks.py", "scaletrain/cli/plan.py"}


def test_trainer_refuses_the_layout_of_another_world(tiny_cfg):
    """A caller handing dims of 2 ranks to a one-process runtime is a bug: refused before
    anything is built (the run directory does not appear)."""
    one = Runtime(torch.device("cpu"), rank=0, world=1)
    with pytest.raises(ValueError, match="world of 2 ranks handed to a runtime of 1"):
        Trainer(tiny_cfg, one, ParallelDims(dp_replicate=1, dp_shard=2, tp=1, pp=1, world=2))
    assert not Path(tiny_cfg.run.dir).exists()


def test_bench_refuses_the_parameter_server_mode(monkeypatch, tmp_path, capsys):
    """`scaletrain bench` builds the Trainer from the layout validation resolved; the
    parameter-server mode has none (its world is servers + workers): one line, exit 2,
    nothing created. In process, on a rank of a 3-process world (1 server, 2 workers)."""
    from scaletrain.cli import main

    for k, v in (("WORLD_SIZE", "3"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                 ("LOCAL_WORLD_SIZE", "3")):
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    assert main(["bench", f"--run.dir={run}", "--parallel.mode=ps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.mode='ps'" in err[0] and "not benched" in err[0], err
    assert not run.exists()
