"""Parallelism applied from outside the model (DESIGN.md principle 2): `ParallelDims`,
process-group setup, DDP, FSDP2/HSDP, activation checkpointing and their composition."""

from scaletrain.parallel.dims import ParallelDims, resolve_dims

__all__ = ["ParallelDims", "resolve_dims"]
