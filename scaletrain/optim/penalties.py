"""L1 and L2 weight penalties, added to the loss once per optimizer step.

    loss = mean token loss + l1 · Σ|w| + (l2 / 2) · Σ w²

Unlike AdamW's decoupled weight decay (Loshchilov & Hutter 2019), these terms are part of
the objective: their gradients pass through the optimizer's statistics (Adam's moments).

The penalty does not depend on the data, so instead of adding it to each micro-batch's
loss (k times, or with a 1/k factor that is only right for equal micro-batches) its
gradient, l1·sign(w) + l2·w, is added to `.grad` once, after all micro-batches and the
data-parallel gradient reduction (every rank adds the same term to the same averaged
gradient), and after fp16 unscaling. Gradient accumulation stays exact, and elementwise
ops work unchanged on sharded (DTensor) parameters. sign(0) = 0 is the subgradient
autograd uses for |w| at 0.
"""

from __future__ import annotations

import torch


class WeightPenalty:
    """Adds the gradient of the L1/L2 penalty to `params`' gradients when called."""

    def __init__(self, params: list[torch.nn.Parameter], l1: float = 0.0, l2: float = 0.0):
        self.params, self.l1, self.l2 = list(params), float(l1), float(l2)

    @torch.no_grad()
    def __call__(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        weights = [p for p in self.params if p.grad is not None]
        if not grads:
            return
        if self.l1:
            torch._foreach_add_(grads, torch._foreach_sign(weights), alpha=self.l1)
        if self.l2:
            torch._foreach_add_(grads, weights, alpha=self.l2)

    @torch.no_grad()
    def value(self) -> float:
        """The penalty term of the loss (for reporting)."""
        total = 0.0
        for p in self.params:
            if self.l1:
                total += self.l1 * p.abs().sum().item()
            if self.l2:
                total += 0.5 * self.l2 * p.pow(2).sum().item()
        return total


def no_penalty() -> None:
    """The step hook when neither l1 nor l2 is set."""


def build_penalty(params: list[torch.nn.Parameter], l1: float, l2: float):
    """The step's penalty hook: a `WeightPenalty`, or a no-op when both are 0."""
    return WeightPenalty(params, l1, l2) if (l1 or l2) else no_penalty
