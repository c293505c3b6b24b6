"""Parallelism applied from outside the model (DESIGN.md principle 2): process-group
setup, DDP, FSDP2/HSDP, activation checkpointing and their composition, for the degrees
of config/dims.py's `ParallelDims`."""
