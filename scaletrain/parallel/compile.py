"""`train.compile`: torch.compile each transformer block, and time the compilation.

Per block, not the whole model (torchtitan `apply_compile`): every block has the same
code, so dynamo traces and inductor compiles it once and reuses the graph for all blocks
(parameters are graph inputs, `inline_inbuilt_nn_modules`), which keeps compile time
independent of depth; and FSDP2's per-block hooks (all-gather, reshard) and DDP's
gradient hooks stay outside the compiled regions, so no graph breaks on collectives.
Order (parallelize.py): after activation checkpointing — the block's `forward` is already
the checkpointed one, and dynamo traces `torch.utils.checkpoint` as a higher-order op —
and before FSDP/DDP, which must wrap the compiled module.

`nn.Module.compile()` compiles the module's call in place: no `_orig_mod.` wrapper, so
parameter names (seeded init, checkpoints, TP plans) do not change.

The loss is compiled too. A GPT computes it in its forward (`GPT.head_loss`: final
LayerNorm, tied output head, summed cross-entropy), and that is compiled as one region:
inductor fuses the fp32 upcast, log-softmax and NLL into one pass over the
(tokens × vocabulary) logits, forward and backward, and the head's matmuls and the cast
of the tied weight run inside the graph; eager materialises an fp32 copy and an fp32
log-softmax of the logits (2048 × 8192 logits: 0.21 s eager vs 0.07 s compiled per
micro-batch forward+backward, 1 thread, this machine). Head + loss in one region is a
further ~2.5% of the gpt-10m bf16 step over the loss compiled alone (in-process,
interleaved). Other models, and GPT logits under tensor parallelism or a custom loss,
use `compile_cross_entropy` on the logits.

`train.compile_scope = "model"` compiles the whole forward instead (one process only):
gpt-10m bf16 on this CPU, in-process interleaved, ~2.7% faster per step than per-block,
for about twice the compile time (13.8 s vs 6.2 s) which grows with depth.

Compilation is lazy: it happens in the first training step. `StepClock` times that step
apart from the others; `compile_s` = first step - mean of the later steps.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn as nn

from scaletrain.models.losses import sum_cross_entropy


def apply_compile(model: nn.Module, scope: str = "blocks") -> nn.Module:
    """Compile every block of `model.blocks` and the head + loss in place; with
    `scope="model"` (or a model without blocks) the whole forward as one graph."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or scope == "model":  # MLP / CNN models: one region
        # One graph from the embedding to the loss (as Lightning's compiled
        # training_step): inductor fuses across block boundaries and there is one
        # guard check and one autograd node per step instead of one per block. Only
        # for one process (parallelize refuses it otherwise): FSDP/DDP hooks and
        # pipeline stages need the block boundaries.
        model.compile()
        return model
    for block in blocks.values():
        if block is not None:  # a pipeline stage deletes the blocks of other stages
            block.compile()
    if getattr(model, "lm_head", None) is not None and hasattr(model, "head_loss"):
        # An instance attribute, as Module.compile() does: names and modules unchanged.
        model.head_loss = torch.compile(model.head_loss)
    return model


def head_computes_loss(model: nn.Module, pcfg) -> bool:
    """Whether the step may call `model(x, targets=y)` for the default loss: a model
    with `head_loss` and its whole head on this rank, without TP's sharded logits
    (loss_parallel) or a pipeline (whose last stage computes the loss itself)."""
    return (hasattr(model, "head_loss") and getattr(model, "lm_head", None) is not None
            and pcfg.tp == 1 and pcfg.pp == 1)


def compile_cross_entropy(enabled: bool):
    """The step's default loss (models/losses.py `sum_cross_entropy`), compiled if
    `enabled`. Tensor parallel's vocabulary-sharded (DTensor) logits keep the eager one:
    its `loss_parallel` context is not traced by dynamo."""
    return torch.compile(sum_cross_entropy) if enabled else sum_cross_entropy


class StepClock:
    """Wall time of each training step; the first (compiling) one kept apart."""

    def __init__(self) -> None:
        self.first_s: float | None = None
        self.rest: list[float] = []

    def add(self, seconds: float) -> None:
        if self.first_s is None:
            self.first_s = seconds
        else:
            self.rest.append(seconds)

    def report(self, compiled: bool) -> dict:
        """`first_step_s`, `step_s` (median of later steps), `compile_s` (None if off)."""
        step_s = statistics.median(self.rest) if self.rest else None
        compile_s = None
        if compiled and self.first_s is not None:
            # The mean, not the median, of later steps: compile time is what the first
            # step costs beyond an ordinary one. Without later steps: the whole first step.
            base = statistics.fmean(self.rest) if self.rest else 0.0
            compile_s = max(0.0, self.first_s - base)
        return {"first_step_s": self.first_s, "step_s": step_s, "compile_s": compile_s}
