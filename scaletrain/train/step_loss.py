"""The micro-batch loss of a run, chosen once when the run is built: (model, inputs,
targets, policy, loss dtype) -> the loss *summed* over target positions (train/step.py
divides by the step's global count).

Three kinds, decided by the config, not per micro-batch:
- in-model: `model(x, targets=y)` returns the summed cross-entropy itself (GPT.head_loss;
  with train.compile the head and loss are one compiled region);
- cross-entropy on the model's logits as they are (bf16 under autocast): the loss upcasts
  inside, so that with train.compile the cast, log-softmax and NLL fuse (parallel/compile.py);
- a custom loss (distillation, compress/distill.py): (logits, inputs, targets) -> summed
  loss, handed the logits in the loss dtype.

The same value serves both step paths: train/step.py calls it on a micro-batch; a
pipeline's last stage only sees logits, so its schedule calls `on_logits` through one
small adapter (parallel/pipeline_step.py `Pipeline._loss`). TP's loss-parallel (logits
sharded over the vocabulary) is part of the loss: `context` is torch's `loss_parallel`,
which both paths hold around forward, loss and backward, and the replicated DTensor sum
comes back as a plain tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from scaletrain.compress.distill import build_distill_loss
from scaletrain.models.documents import document_kwargs
from scaletrain.parallel.compile import compile_cross_entropy, head_computes_loss
from scaletrain.parallel.tensor import tp_loss_context
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import count_targets, sum_cross_entropy

CustomLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (logits, inputs or None, targets, loss dtype) -> summed loss
LogitsLoss = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.dtype],
                      torch.Tensor]


@dataclass(frozen=True)
class StepLoss:
    """The run's loss; call it as (model, x, y, policy, loss dtype) -> summed loss."""

    on_logits: LogitsLoss  # the loss given the model's logits
    in_model: bool = False  # the model computes the loss itself: model(x, targets=y)
    # Around forward + loss + backward: loss_parallel for vocabulary-sharded logits.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # data.document_masking: the end-of-text id the documents of a window are cut at
    # (models/documents.py); None = attention across the whole window.
    eot_id: int | None = None

    def model_kwargs(self, x: torch.Tensor) -> dict:
        """The forward's keywords for inputs `x`: {'doc_ids': ...} under document masking
        (derived from `x` itself, so the batch stays (inputs, targets)), else {}."""
        return document_kwargs(x, self.eot_id)

    def stage_kwargs(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """A pipeline stage's keywords: `model_kwargs`, + the targets for the in-model
        loss (the last stage's forward returns the summed loss; the others pass them by)."""
        kw = self.model_kwargs(x)
        return {**kw, "targets": y} if self.in_model else kw
    # The model's own loss terms of the forward just run (MoE balance and z losses,
    # models/moe_terms.py): a per-token sum with its graph, or None. The step divides it
    # by the same global count as the loss and adds it to the gradient only: the logged
    # loss stays the cross-entropy.
    extra: Callable[[], "torch.Tensor | None"] = lambda: None
    # What a micro-batch's loss is normalised by: its target tokens (train/dpo.py's
    # DPOLoss, the other step loss, counts pairs).
    count: Callable[[torch.Tensor], torch.Tensor] = count_targets

    def start_step(self) -> None:
        """A step begins (DPOLoss restarts its reward sums; nothing here)."""

    def record(self, reducer) -> dict:
        """The loss's own keys of a train record (DPOLoss: rewards); none here."""
        return {}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 policy: PrecisionPolicy, loss_dtype: torch.dtype) -> torch.Tensor:
        kw = self.model_kwargs(x)
        with policy.autocast():
            if self.in_model:  # the loss upcasts the logits itself
                loss = model(x, targets=y, **kw)
            else:
                logits = model(x, **kw)
        if not self.in_model:
            loss = self.on_logits(logits, x, y, loss_dtype)
        # loss_parallel's sum is a replicated DTensor: the plain tensor the step divides.
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def build_step_loss(loss_fn: CustomLoss | None = None,
                    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    = sum_cross_entropy, loss_in_model: bool = False,
                    loss_parallel: bool = False, eot_id: int | None = None) -> StepLoss:
    """The run's micro-batch loss: the in-model loss where the model computes it
    (`loss_in_model`: the caller sets it only for the default loss), else `loss_fn` if
    given, else `cross_entropy` on the logits. `loss_parallel`: tensor parallelism left
    the logits vocabulary-sharded (ParallelModel.tp_loss_parallel). `eot_id`: document
    masking at this end-of-text id (StepLoss.eot_id)."""
    context = tp_loss_context(loss_parallel)
    if loss_fn is not None and not loss_in_model:
        def custom(logits, x, y, loss_dtype):
            return loss_fn(logits.to(loss_dtype), x, y)
        return StepLoss(custom, context=context, eot_id=eot_id)

    def on_logits(logits, x, y, loss_dtype):
        return cross_entropy(logits, y)
    # In-model: the head's own cross-entropy; on_logits is the same loss on its logits.
    return StepLoss(on_logits, in_model=loss_in_model, context=context, eot_id=eot_id)


default_step_loss = build_step_loss()


def run_loss(cfg, pm, device: torch.device, eot_id: int | None = None) -> StepLoss:
    """The loss of the run `cfg` on the ParallelModel `pm`, built once by the trainer:
    distillation, the in-model head + loss, or cross-entropy on the logits; under TP's
    loss-parallel where the logits are vocabulary-sharded; document-masked at `eot_id`
    (models/documents.py `masking_eot`) when given. `model.loss_chunks` makes it the
    in-model loss on every layout (TP: the head's chunks run under loss_parallel; a
    pipeline's last stage gets the targets as a keyword: parallel/pipeline_step.py),
    since the chunked head never hands out logits."""
    distill_loss = build_distill_loss(cfg, device)
    # Compiled cross-entropy for the plain step only: TP's DTensor logits are not traced
    # by dynamo, and the pipeline's schedule keeps the eager loss it always had.
    compiled = cfg.train.compile and cfg.parallel.tp == 1 and cfg.parallel.pp == 1
    return build_step_loss(
        distill_loss, compile_cross_entropy(compiled),
        loss_in_model=distill_loss is None and (head_computes_loss(pm.module, cfg.parallel)
                                                or cfg.model.loss_chunks > 0),
        loss_parallel=pm.tp_loss_parallel, eot_id=eot_id)
