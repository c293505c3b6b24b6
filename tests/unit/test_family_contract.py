"""The family contract (models/contract.py, issue 14 item 5): a family added as a model
plus one `ModelSpec` entry builds, ties, splits into pipeline stages and saves/loads its
weights through the run directory, with no edit anywhere else; and the code no longer
sniffs the family or stashes layout facts on modules (scripts/arch_metrics.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from scaletrain.config import build_config
from scaletrain.config.model_checks import FAMILY_RULES
from scaletrain.config.schema import ModelConfig
from scaletrain.models import registry
from scaletrain.models.contract import PipelineSplit, tied_copies
from scaletrain.models.registry import ModelSpec, build_model, spec_for, spec_of
from scaletrain.parallel.pipeline import prune_to_stage
from scaletrain.checkpoint.run_model import load_weights, save_weights

REPO = Path(__file__).resolve().parents[2]


class ToyDecoder(nn.Module):
    """A throw-away decoder with names of its own: `emb` in, residual MLP `blocks`,
    `norm` + `out` head (optionally tied to `emb`). Knows nothing of scaletrain."""

    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleDict({str(i): nn.Linear(width, width) for i in range(depth)})
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, idx, targets=None):
        x = self.emb(idx) if self.emb is not None else idx
        for b in self.blocks.values():
            x = x + F.gelu(b(x))
        if self.out is not None:
            x = self.out(self.norm(x))
        return x

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _spec(tied: bool) -> ModelSpec:
    return ModelSpec("toy", "text",
                     lambda m, facts: ToyDecoder(facts["vocab_size"], m.d_model, m.n_layer),
                     tied=(("out.weight", "emb.weight"),) if tied else (),
                     pipeline=PipelineSplit(first=("emb",), last=("norm", "out")))


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def toy(request, monkeypatch):
    """(config with model.name='toy', its spec), registered for this test only."""
    spec = _spec(request.param)
    monkeypatch.setitem(registry.REGISTRY, "toy", spec)
    cfg = build_config(None, [])
    mcfg = ModelConfig(name="toy", n_layer=3, d_model=16, seq_len=8)
    return dataclasses.replace(cfg, model=mcfg), spec


def test_toy_family_builds_ties_saves_and_loads(toy, tmp_path):
    cfg, spec = toy
    assert spec_of(cfg.model) is spec and spec_for("toy") is spec
    facts = {"vocab_size": 11}
    model = build_model(cfg.model, facts, seed=1)
    tied = bool(spec.tied)
    assert (model.out.weight is model.emb.weight) == tied  # materialize re-tied it
    path = tmp_path / "model.safetensors"
    save_weights(model, path, cfg)
    stored = set(load_file(str(path)))
    assert ("out.weight" in stored) == (not tied)  # a tied head is stored once
    other = build_model(cfg.model, facts, seed=2)
    load_weights(other, path, spec.tied)
    assert (other.out.weight is other.emb.weight) == tied
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    idx = torch.randint(0, 11, (2, 8))
    assert torch.equal(model(idx), other(idx))


def test_toy_family_splits_into_stages_by_its_spec(toy):
    cfg, spec = toy
    with torch.device("meta"):
        last = spec.build(cfg.model, {"vocab_size": 11})
    prune_to_stage(last, spec.pipeline, (2, 3), first=False, last=True)
    assert last.emb is None and last.out is not None and list(last.blocks) == ["2"]
    # The last stage's head without its embedding is a copy of it (only when tied).
    assert tied_copies(last, spec.tied) == ({"out.weight": "emb.weight"} if spec.tied else {})
    with torch.device("meta"):
        first = spec.build(cfg.model, {"vocab_size": 11})
    prune_to_stage(first, spec.pipeline, (0, 1), first=True, last=False)
    assert first.out is None and first.norm is None and tied_copies(first, spec.tied) == {}


def test_validation_rules_agree_with_the_registry():
    """config/model_checks.py repeats, below models/, what validation needs of each
    family (kind, blocks or not, its field rules): the same families, the same facts."""
    choices = dataclasses.fields(ModelConfig)[0].metadata["choices"]  # model.name
    assert set(FAMILY_RULES) == set(registry.REGISTRY) == set(choices)
    for name, spec in registry.REGISTRY.items():
        rules = FAMILY_RULES[name]
        assert (rules.kind, rules.blocks, rules.check) == (
            spec.kind, spec.activation_block is not None, spec.check), name


def test_no_family_sniffs_or_stashed_layout_facts():
    """scripts/arch_metrics.py's counts of both measures are 0 on scaletrain/."""
    path = REPO / "scripts" / "arch_metrics.py"
    mod_spec = importlib.util.spec_from_file_location("arch_metrics", path)
    metrics = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(metrics)
    labels = [k for k in metrics.PATTERNS if k.startswith(("family sniff", "layout facts"))]
    assert len(labels) == 2
    hits = [f"{f}:{no}" for f in sorted((REPO / "scaletrain").rglob("*.py"))
            for no, line in enumerate(f.read_text().splitlines(), 1)
            for k in labels if re.search(metrics.PATTERNS[k], line)]
    assert hits == []
