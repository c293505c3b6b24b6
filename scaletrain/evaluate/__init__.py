"""Validation and test evaluation."""

from scaletrain.evaluate.evaluator import evaluate

__all__ = ["evaluate"]
