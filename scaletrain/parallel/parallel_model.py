"""`ParallelModel`: what building the parallel model returns (parallel/parallelize.py
`build_parallel_model`) — this rank's module and the layout facts the pipeline, the step,
the optimizer and the checkpoint need about it, handed to them explicitly instead of
being stashed on modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from scaletrain.models.registry import ModelSpec


@dataclass(frozen=True)
class ParallelModel:
    module: nn.Module  # this rank's model: the whole one, or its pipeline stage(s)
    spec: ModelSpec  # its family (tied pairs, pipeline split, TP plan)
    # Several pipeline stages on this rank (interleaved schedule): one module per stage
    # sharing `module`'s blocks, each an FSDP root (parallel/model_parallel.py). None
    # with one stage per rank (`module` is the stage) or no pipeline.
    stage_views: tuple[nn.Module, ...] | None = None
    # Tensor parallelism left the logits vocabulary-sharded (parallel.loss_parallel):
    # the loss must run under torch's loss_parallel context.
    tp_loss_parallel: bool = False
    # {head parameter: embedding parameter} for the tied heads this rank holds without
    # their embedding (a pipeline's last stage): copies that count and decay as the
    # embedding and read its optimizer state on load (models/contract.py).
    tied_copies: dict[str, str] = field(default_factory=dict)
