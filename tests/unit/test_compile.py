"""`train.compile`: per-block torch.compile gives the losses of eager training.

Tolerances. fp32: inductor fuses the element-wise ops (LayerNorm, GELU, residual adds)
and may reorder their reductions, so each op differs by a few fp32 ulps (~1e-7
relative); through 3 AdamW steps on a 1-layer model that stays far below 1e-4 relative.
bf16 autocast: eager rounds every op's output to bf16, a fused kernel keeps its
intermediates in fp32, so losses differ by up to a few bf16 ulps (2^-8 = 0.4% relative);
2% is the bound the precision tests already use for bf16 against fp32.

Each case compiles the CPU inductor backend (C++ via gcc): ~20-60 s per case on the 2
shared cores, the slowest tests of the unit suite, hence one tiny model, 3 steps.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_cfg, one_process_trainer


@pytest.fixture(autouse=True)
def fresh_compile_caches(tmp_path, monkeypatch):
    """Each case compiles from nothing. In one pytest worker other tests have compiled the
    same block code: dynamo's in-process cache (past its recompile limit it runs the block
    eagerly) and inductor's warm on-disk cache both make the first step cost no compile
    time (compile_s = 0 was seen in the full suite)."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    yield
    torch._dynamo.reset()


def losses(tiny_args, tmp_path, name: str, extra: list[str]) -> tuple[list[float], dict]:
    run = tmp_path / name
    cfg = make_cfg(tiny_args + [f"--run.dir={run}", "--train.steps=3", "--eval.test=false",
                                "--model.n_layer=1", *extra])
    summary = one_process_trainer(cfg).fit()
    with open(run / "metrics.jsonl") as f:
        recs = [r for r in map(json.loads, f) if r["kind"] == "train"]
    return [r["loss"] for r in recs], summary


# fp32 with full and with selective activation checkpointing (compile traces the
# checkpointed block; selective AC's save-list policy runs inside the compiled graph),
# bf16 without: the backward graph with recomputation doubles the compile time, and AC's
# order is already covered in fp32.
@pytest.mark.parametrize("dtype,rtol,ac", [("fp32", 1e-4, "full"), ("fp32", 1e-4, "selective"),
                                          ("bf16", 2e-2, "none")])
def test_compile_matches_eager_losses(tiny_args, tmp_path, dtype, rtol, ac):
    extra = [f"--precision.dtype={dtype}", f"--parallel.activation_checkpoint={ac}"]
    eager, s_eager = losses(tiny_args, tmp_path, "eager", extra)
    comp, s_comp = losses(tiny_args, tmp_path, "compiled", extra + ["--train.compile=true"])
    assert len(eager) == len(comp) == 3
    assert comp == pytest.approx(eager, rel=rtol)
    assert eager[-1] < eager[0]  # the run trains: equal losses are not both stuck
    # Compile time is reported apart; the eager run has none.
    assert s_eager["compile_s"] is None
    assert s_comp["compile_s"] > 0 and s_comp["first_step_s"] > s_comp["step_s"]


def test_compile_scope_model_matches_eager_losses(tiny_args, tmp_path):
    """`train.compile_scope=model`: the whole forward + loss as one graph, same losses."""
    extra = ["--precision.dtype=fp32"]
    eager, _ = losses(tiny_args, tmp_path, "eager", extra)
    comp, s_comp = losses(tiny_args, tmp_path, "whole", extra + [
        "--train.compile=true", "--train.compile_scope=model"])
    assert comp == pytest.approx(eager, rel=1e-4) and eager[-1] < eager[0]
    # Reported (>= 0: with inductor's on-disk cache warm the first step may cost nothing).
    assert s_comp["compile_s"] is not None and s_comp["compile_s"] >= 0


def test_compile_scope_model_is_refused_on_several_ranks(tiny_cfg):
    from scaletrain.errors import ConfigError
    from scaletrain.models import build_model
    from scaletrain.config.dims import ParallelDims
    from scaletrain.parallel.parallelize import parallelize
    from scaletrain.precision import PrecisionPolicy

    import torch

    model = build_model(tiny_cfg.model, {"vocab_size": 384}, seed=0)
    dims = ParallelDims.resolve(2, 1, 1, 1, 2)
    with pytest.raises(ConfigError, match="compile_scope='model' needs one process"):
        parallelize(model, dims, None, tiny_cfg.parallel,
                    PrecisionPolicy("fp32", torch.device("cpu")), torch.device("cpu"),
                    compile="model")
