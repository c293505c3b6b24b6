"""Checkpoints: DCP manager (atomic, verified, async), resume glue, export."""
