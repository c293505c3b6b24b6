"""model.loss_chunks = -1 (auto): chunked where one micro-batch's fp32 logits reach
32 MiB and the fused head holds at most half the unchunked head's bytes, on the fused
path only (models/loss_chunks_auto.py), and `plan` counts what the run resolves."""

from __future__ import annotations

import pytest

from scaletrain.config import build_config
from scaletrain.config.dims import ParallelDims
from scaletrain.models.loss_chunks_auto import AUTO, resolve_loss_chunks
from scaletrain.plan.report import plan

# seq 64 x vocab 16384 x 4 B = 4 MiB of fp32 logits per sample: 8 samples reach 32 MiB
SHAPE = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.seq_len=64",
         "model.vocab_size=16384", "train.device=cpu"]
V = 16384


def cfg_of(*extra: str):
    return build_config(None, [tuple(a.split("=", 1)) for a in
                               (*SHAPE, "model.loss_chunks=-1", *extra)])


def test_auto_is_the_default():
    assert build_config(None, []).model.loss_chunks == AUTO
    assert cfg_of().model.loss_chunks == AUTO


@pytest.mark.parametrize("micro,expected", [(8, 8), (7, 0), (1, 0)])
def test_auto_chunks_from_32_mib_of_logits(micro, expected):
    # 8 x 64 x 16384 x 4 B = 32 MiB exactly: chunked; 7 samples (28 MiB) are not
    assert resolve_loss_chunks(cfg_of(), "text", V, micro, tp=1) == expected


def test_auto_stays_whole_where_the_fused_buffers_rival_the_logits():
    # D 1024, 512 tokens, bf16: the fused head's (V, D) weight gradient (64 MiB fp32),
    # its bf16 product (32) and fp32 copy (64) and the weight's cast (32) exceed half of
    # the unchunked 512 x 16384 x 12 B = 96 MiB, though the logits reach 32 MiB
    cfg = cfg_of("model.d_model=1024", "precision.dtype=bf16")
    assert resolve_loss_chunks(cfg, "text", V, 8, tp=1) == 0
    assert resolve_loss_chunks(cfg_of("precision.dtype=bf16"), "text", V, 8, tp=1) == 8


def test_auto_never_more_chunks_than_positions():
    cfg = cfg_of("model.seq_len=4")  # 2048 x 4 x 16384 x 4 B = 512 MiB, 4 positions
    assert resolve_loss_chunks(cfg, "text", V, 2048, tp=1) == 4


@pytest.mark.parametrize("extra,kind,tp", [
    ((), "text", 2),  # TP: the checkpointed path recomputes the head
    (("train.compile=true",), "text", 1),  # the compiled head + loss region
    (("distill.teacher=some/run",), "text", 1),  # the teacher's loss needs the logits
    (("train.objective=dpo",), "text", 1),  # DPO reads log-probs off the logits
    ((), "image", 1),
])
def test_auto_stays_whole_off_the_measured_fused_path(extra, kind, tp):
    assert resolve_loss_chunks(cfg_of(*extra), kind, V, 64, tp) == 0


@pytest.mark.parametrize("n", [0, 3])
def test_an_explicit_value_is_kept(n):
    assert resolve_loss_chunks(cfg_of(f"model.loss_chunks={n}"), "text", V, 64, 1) == n


@pytest.mark.parametrize("micro,chunks", [(8, 8), (4, 0)])
def test_plan_counts_what_auto_resolves(micro, chunks):
    """Auto's plan is the plan of the value the run resolves, byte for byte."""
    batch = [f"train.batch_size={micro}", f"train.micro_batch_size={micro}"]
    one = ParallelDims(1, 1, 1, 1, 1)
    auto = plan(cfg_of(*batch), one, V)
    fixed = plan(cfg_of(*batch, f"model.loss_chunks={chunks}"), one, V)
    assert auto["loss_chunks"] == chunks
    assert auto["ranks"] == fixed["ranks"]
    other = plan(cfg_of(*batch, f"model.loss_chunks={8 - chunks}"), one, V)
    assert other["ranks"][0]["activation_bytes"] != auto["ranks"][0]["activation_bytes"]
