"""Validation and test evaluation."""

from scaletrain.evaluate.evaluator import covered_samples, evaluate, split_batches

__all__ = ["covered_samples", "evaluate", "split_batches"]
