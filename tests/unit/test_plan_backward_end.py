"""The end of the backward, measured: the gradient temporaries plan/memory.py
`backward_temporaries` counts beside the accumulated gradients (a tied head's two V·D
contributions and their sum, one fewer where the head's contribution is a plain tensor:
the fused chunked head's, or autocast's cast; untied, the new gradient of the largest
parameter) are what torch.profiler's allocation events show alive at the peak of an
accumulating micro-batch's forward + backward — or, behind the fused head, the
forward's own buffers (chunked_loss.py `fused_head_tensors`), where those are larger.

The shape makes the embedding nearly everything: V 16384 x D 64 (4 MiB in fp32)
against 4 tokens, so the activations and logits stay below 0.25 V·D·4 (TOLERANCE).
Accumulating micro-batches only: the first one's peak also holds the gradients it
makes, and the profiler, blind to frees of what was allocated before it started,
measures that unevenly."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import build_config
from scaletrain.models import build_model
from scaletrain.models.chunked_loss import fused_head_tensors
from scaletrain.plan.memory import RankShape, backward_temporaries
from tests.unit.test_plan_head import peak_allocated

T, D, V = 4, 64, 16384
EMBEDDING = V * D * 4
TOLERANCE = 0.25 * EMBEDDING


def model_of(family: str, tied: bool, chunks: int):
    over = [("model.name", family), ("model.n_layer", "1"), ("model.d_model", str(D)),
            ("model.n_head", "1"), ("model.seq_len", str(T)),
            ("model.vocab_size", str(V)), ("model.loss_chunks", str(chunks)),
            ("train.device", "cpu")]
    if family == "llama":
        over += [("model.d_ff", "64"), ("model.tie_embeddings", str(tied).lower())]
    cfg = build_config(None, over)
    return build_model(cfg.model, {"vocab_size": V}, seed=0, dtype=torch.float32).train()


def micro_batch(model, autocast: bool):
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, V, (1, T), generator=g) for _ in range(2))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(x, targets=y)  # the model's own head + loss, as the step runs it
    loss.backward()


@pytest.mark.parametrize("family, tied, chunks", [("gpt", True, 0), ("llama", True, 0),
                                                  ("llama", False, 0), ("gpt", True, 2),
                                                  ("llama", True, 2)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backward_end_temporaries_are_what_plan_counts(family, tied, chunks, precision):
    autocast = precision == "bf16"
    model = model_of(family, tied, chunks)
    numels = [p.numel() for p in model.parameters()]  # a tied weight is listed once
    shape = RankShape(params=float(sum(numels)), largest_param=float(max(numels)),
                      layers=1, tokens=T, in_flight=1, has_head=True, vocab_local=V,
                      tp=1, accum=2, ddp=False, eval_tokens=0,
                      tied_embedding=float(V * D) if tied else 0.0)
    size, count = backward_temporaries(shape, 4, 2 if autocast else 4, fused=chunks > 0)
    expected = size * count
    if chunks:
        held, forward_only = fused_head_tensors(precision, T, V, D, chunks)
        expected = max(expected, sum(held.values()) + sum(forward_only.values()))

    micro_batch(model, autocast)  # every gradient exists: the next ones accumulate
    measured = peak_allocated(lambda: micro_batch(model, autocast))
    assert abs(measured - expected) <= TOLERANCE, (
        f"measured {measured / EMBEDDING:.2f} V·D, plan {expected / EMBEDDING:.2f} V·D")
