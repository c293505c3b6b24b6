"""`scaletrain plan`, `--fit` and `plan.auto` on the llama family: parameter bytes from
the model built on meta, blocks and head found through the family's spec, and the real
Llama 3 8B shape fitting 80 GB GPUs on 8 ranks."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from scaletrain.cli import main
from scaletrain.config import build_config
from scaletrain.models import build_model, count_params
from scaletrain.config.batch_plan import batch_plan
from scaletrain.config.dims import ParallelDims
from scaletrain.plan.report import plan
from scaletrain.plan.fit import candidates, fit

SHAPE = ["model.name=llama", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
         "model.n_kv_head=2", "model.d_ff=96", "model.seq_len=32", "model.vocab_size=64",
         "train.batch_size=4", "train.micro_batch_size=4", "eval.batch_size=4",
         "train.device=cpu", "precision.dtype=fp32"]

ONE_RANK = ParallelDims(1, 1, 1, 1, 1)  # the layout of one process


def cfg_of(*extra: str):
    return build_config(None, [tuple(a.split("=", 1)) for a in (*SHAPE, *extra)])


@pytest.mark.parametrize("tied", [False, True])
def test_llama_plan_counts_the_built_model_its_blocks_and_head(tied):
    cfg = cfg_of(f"model.tie_embeddings={str(tied).lower()}")
    r = plan(cfg, ONE_RANK, 64)["ranks"][0]
    model = build_model(cfg.model, {"vocab_size": 64}, seed=0)
    assert r["params"] == count_params(model)  # a tied head counted once
    assert r["param_bytes"] == 4 * count_params(model)
    assert r["layers"] == 2
    # The head's fp32 CE tensors (3 · 4 B per token·vocab) are in.
    assert r["activation_bytes"] > 4 * 32 * 64 * 3 * 4


def test_llama_fit_searches_activation_checkpointing_and_plan_auto_is_accepted():
    cfg = cfg_of("plan.auto=true", "model.seq_len=256", "train.batch_size=8",
                 "train.micro_batch_size=8", "eval.batch_size=1")
    ranks = plan(cfg, ONE_RANK, 64)["ranks"][0]
    # A budget just under the plain peak, above the smallest: the search must find one.
    budget = ranks["peak_bytes"] - 2 ** 20
    choice = fit(cfg, ONE_RANK, 64, budget)
    assert choice.peak_bytes <= budget and choice.overrides
    acs = {o["parallel.activation_checkpoint"]
           for o, _ in candidates(cfg, ONE_RANK, batch_plan(cfg, 1, pp=1), "cpu")}
    assert acs == {"none", "selective", "full"}


def test_llama3_8b_plan_on_8_ranks_fits_80gb_gpus():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--config", "configs/llama3-8b.toml", "--world", "8",
                     "--json"]) == 0
    r = json.loads(out.getvalue())
    rank = r["ranks"][0]
    assert rank["layers"] == 32 and rank["baseline_bytes"] == 0  # planned for CUDA
    # 8.03B parameters (Meta's count), sharded 8 ways by FSDP2
    assert abs(rank["params"] * 8 - 8_030_261_248) < 1e3
    assert r["memory_gib"] == 74.5 and r["fits"]  # 80e9 B = 74.5 GiB
    assert rank["peak_bytes"] <= 74.5 * 2 ** 30
