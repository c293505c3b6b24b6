"""Evaluation of a model on a split: mean loss per target (and accuracy for images)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scaletrain.models.documents import document_kwargs
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import IGNORE_INDEX, count_targets, sum_cross_entropy


def split_batches(split: str, eval_cfg) -> int:
    """How many evaluation batches a split gets during and at the end of a run (0 = all).

    Validation runs many times during training, so it reads a fixed sample of
    `eval.batches` batches; the test evaluation runs once, at the end, is the number a
    run reports, and by default covers the whole split (`eval.test_batches` = 0) — the
    number `scaletrain eval --split test` gives, which reads the same `eval.test_batches`
    (issue 13 item 5: 640 of 3,315 samples had reported 4.15 where the split gives 3.67).
    """
    return eval_cfg.test_batches if split == "test" else eval_cfg.batches


def covered_samples(dataset, batch_size: int, batches: int) -> int:
    """Samples that `eval_batches(dataset, batch_size, batches)` evaluates."""
    n = len(dataset)
    return n if batches <= 0 else min(n, batches * batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, batches, policy: PrecisionPolicy, device: torch.device,
             kind: str, count_reducer=lambda t: t, eot_id: int | None = None) -> dict:
    """Loss averaged over every target position of `batches` (not a mean of batch means).

    Returns {"loss", "ppl"} for text and {"loss", "accuracy"} for images. `count_reducer`
    sums the (loss, count, correct) vector over data-parallel ranks when there are several.
    `eot_id`: documents masked at this end-of-text id, as the run trained
    (data.document_masking; models/documents.py).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, count, correct
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with policy.autocast():
            logits = model(x, **document_kwargs(x, eot_id))
        if hasattr(logits, "full_tensor"):  # vocabulary-sharded (tensor parallel)
            logits = logits.full_tensor()
        totals[0] += sum_cross_entropy(logits, y).double()
        totals[1] += count_targets(y)
        if kind == "image":
            totals[2] += ((logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum()
    model.train(was_training)
    totals = count_reducer(totals)
    loss_sum, count, correct = totals.tolist()
    if count == 0:
        raise ValueError("evaluation saw no targets")
    loss = loss_sum / count
    out = {"loss": loss}
    if kind == "image":
        out["accuracy"] = correct / count
    else:
        out["ppl"] = math.exp(min(loss, 700.0))
    return out


def mixture_result(by_source: dict[str, dict], weights: list[float]) -> dict:
    """One evaluation of a data.mixture from each source's own (`evaluate` results, in
    the mixture's order; `weights` sum to 1): `loss_by_source`, and `loss` their mean
    weighted by the mixture — the expected loss on the distribution the run trains on,
    whatever the sizes of the sources' splits."""
    loss = math.fsum(w * r["loss"] for r, w in zip(by_source.values(), weights))
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "loss_by_source": {name: r["loss"] for name, r in by_source.items()}}
