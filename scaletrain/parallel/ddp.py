"""DDP: full replicas, gradients all-reduced in buckets that overlap the backward.

`torch.distributed._composable.replicate` is `DistributedDataParallel` applied from
outside without wrapping the module (torchtitan `apply_ddp`), so parameter names — and
with them the seeded initialisation and the checkpoint keys — stay those of the plain
model. The underlying DDP is built lazily at the first forward; it buckets gradients
(`bucket_cap_mb`) and launches each bucket's all-reduce as soon as its gradients are
ready, overlapping communication with the rest of the backward (Li et al. 2020, "PyTorch
Distributed", §3.2.3). DDP averages gradients over the group; the step multiplies the
loss by the data-parallel degree to turn that mean into the sum that the global
target-count normalisation needs (train/step.py).
"""

from __future__ import annotations

import contextlib

import torch.nn as nn


def apply_ddp(model: nn.Module, mesh, bucket_cap_mb: int = 25) -> nn.Module:
    """Make `model` a DDP replica over the 1-D `mesh` (in place; returns it)."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=mesh, bucket_cap_mb=bucket_cap_mb)
    return model


@contextlib.contextmanager
def ddp_no_sync(model: nn.Module):
    """Skip the gradient all-reduce for forwards/backwards inside (accumulation)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
