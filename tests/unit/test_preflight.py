"""The checks run before a launch or any allocation (issue 13): the memory pre-flight
(plan/preflight.py), the world-size rules shared by plan and train
(parallel/world_checks.py) and `~` in path fields (config/paths.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.config import build_config
from scaletrain.errors import ConfigError
from scaletrain.config.dims import ParallelDims
from scaletrain.parallel.world_checks import check_world
from scaletrain.plan import preflight

ROOT = Path(__file__).parents[2]
GiB = 2 ** 30
ONE_RANK = ParallelDims(1, 1, 1, 1, 1)  # the layout of one process


@pytest.fixture
def machine_of(monkeypatch):
    """Pretend this machine has `gib` GiB per rank (the check must not depend on the
    machine the tests run on)."""
    def set_gib(gib: float) -> None:
        monkeypatch.setattr(preflight, "machine_bytes", lambda *_a, **_k: gib * GiB)
    return set_gib


def _cpu_presets() -> list[str]:
    """The presets for this machine: not the GPU planning shapes (train.device = "cuda":
    llama3-8b, qwen3-0.6b), which are judged on their GPUs at their world size."""
    return sorted(str(p) for p in (ROOT / "configs").glob("*.toml")
                  if 'device = "cuda"' not in p.read_text())


@pytest.mark.parametrize("path", _cpu_presets())
def test_every_preset_fits_a_24_gib_machine(path, machine_of):
    # gpt-1b is meant for this 24 GiB machine (MemTotal 23.5 GiB): no false refusal.
    machine_of(23.5)
    preflight.check_memory(build_config(path), dims=ONE_RANK, local_world=1)


def test_a_config_over_the_machine_is_refused_with_the_figure(machine_of):
    machine_of(16.0)  # gpt-1b's predicted peak is ~21 GiB
    cfg = build_config(str(ROOT / "configs/gpt-1b.toml"))
    with pytest.raises(ConfigError, match=r"predicted peak memory of this run is 2\d\.\d "
                                          r"GiB per rank.*16.0 GiB.*scaletrain plan --fit"):
        preflight.check_memory(cfg, dims=ONE_RANK, local_world=1)


def test_full_batch_is_judged_on_the_train_split(machine_of):
    machine_of(4.0)
    cfg = build_config(None, [("train.descent", "full-batch"), ("model.d_model", "512"),
                              ("model.n_head", "8")])
    preflight.check_memory(cfg, ONE_RANK, 1)  # before the data: the split size is not known
    preflight.check_memory(cfg, ONE_RANK, 1, n_train=64)
    with pytest.raises(ConfigError, match="a step's batch of 100,000 samples.*full-batch"):
        preflight.check_memory(cfg, ONE_RANK, 1, n_train=100_000)


def test_ranks_on_one_machine_share_its_memory(monkeypatch):
    monkeypatch.setattr(preflight.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096,
                                                               "SC_PHYS_PAGES": 2 ** 20}[name])
    monkeypatch.setattr(preflight, "_CGROUP_MAX", Path("/nonexistent/memory.max"))
    assert preflight.machine_bytes("cpu", 4) == 4 * GiB / 4


@pytest.mark.parametrize("overrides, world, fragment", [
    ([("parallel.pp", "3"), ("model.n_layer", "4")], 3, "must divide model.n_layer=4"),
    ([("parallel.tp", "3"), ("model.n_head", "4")], 3, "parallel.tp=3 must divide model.n_head"),
    # FSDP2 runs the converters now (on the meta model); TP still refuses them
    ([("finetune.freeze", "wte"), ("parallel.tp", "2")], 2,
     "with DDP or FSDP2, not TP / PP / EP"),
    ([("train.compile", "true"), ("train.compile_scope", "model")], 2,
     "compile_scope='model' needs one process"),
    ([], 0, "at least 1 process"),
    ([], 3, "divisible by the data-parallel degree 3"),
])
def test_world_rules(overrides, world, fragment):
    cfg = build_config(None, overrides)
    with pytest.raises(ConfigError, match=fragment):
        check_world(cfg, world)


def test_world_rules_leave_an_unknown_vocabulary_to_the_ranks():
    cfg = build_config(None, [("parallel.tp", "2"), ("parallel.dp_shard", "1")])
    check_world(cfg, 2)  # the tokenizer's vocabulary is not known before the launch
    with pytest.raises(ConfigError, match="vocabulary size.*=301"):
        check_world(cfg, 2, vocab=301)


def test_tilde_is_expanded_in_path_fields_only(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = build_config(None, [("data.source", "~/corpus/**/*.txt"), ("run.dir", "~/runs/a"),
                              ("generate.prompt", "~/not a path")])
    assert cfg.data.source == "/home/someone/corpus/**/*.txt"
    assert cfg.run.dir == "/home/someone/runs/a"
    assert cfg.generate.prompt == "~/not a path"


@pytest.mark.parametrize("key, value, fragment", [
    ("train.seed", str(2 ** 63), "train.seed: must be <= 9223372036854775807"),
    ("generate.seed", "1e30", "generate.seed: must be <="),
    ("train.threads", "100000", "train.threads: must be <= 1024"),
    ("compress.gen_threads", "5000", "compress.gen_threads: must be <= 1024"),
])
def test_seed_and_thread_bounds(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(None, [(key, value)])
    build_config(None, [("train.seed", str(2 ** 63 - 1)), ("train.threads", "1024")])
