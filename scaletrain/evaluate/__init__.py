"""Validation and test evaluation."""

from scaletrain.evaluate.evaluator import (covered_samples, evaluate, mixture_result,
                                           split_batches)

__all__ = ["covered_samples", "evaluate", "mixture_result", "split_batches"]
