"""The distillation loss (compress/distill.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scaletrain.compress.distill import distill_sum_loss, make_distill_loss
from scaletrain.models.losses import IGNORE_INDEX, sum_cross_entropy


def test_alpha_zero_is_cross_entropy_and_equal_logits_have_zero_kl():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(distill_sum_loss(s, t, y, 0.0, 2.0), sum_cross_entropy(s, y))
    torch.testing.assert_close(distill_sum_loss(s, s, y, 1.0, 3.0), torch.tensor(0.0),
                               atol=1e-5, rtol=0)


def test_matches_the_formula_and_skips_ignored_positions():
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    y = torch.tensor([[1, 2, IGNORE_INDEX, 3]])
    T, a = 2.0, 0.3
    keep = [0, 1, 3]
    ps, pt = F.softmax(s[0, keep] / T, -1), F.softmax(t[0, keep] / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum()
    ce = sum(-F.log_softmax(s[0, i], -1)[y[0, i]] for i in keep)
    expect = (1 - a) * ce + a * T * T * kl
    torch.testing.assert_close(distill_sum_loss(s, t, y, a, T), expect, atol=1e-5, rtol=1e-5)


def test_sum_over_micro_batches_equals_the_whole_batch():
    # The step divides summed losses by the global count: splits must add up exactly.
    s, t = torch.randn(4, 6, 9), torch.randn(4, 6, 9)
    y = torch.randint(0, 9, (4, 6))
    whole = distill_sum_loss(s, t, y, 0.5, 2.0)
    parts = distill_sum_loss(s[:1], t[:1], y[:1], 0.5, 2.0) + \
        distill_sum_loss(s[1:], t[1:], y[1:], 0.5, 2.0)
    torch.testing.assert_close(whole, parts)


def test_teacher_is_frozen_in_eval_mode_and_gets_no_grad():
    teacher = torch.nn.Sequential(torch.nn.Embedding(9, 9), torch.nn.Dropout(0.5))
    loss_fn = make_distill_loss(teacher, 0.5, 2.0)
    assert not teacher.training
    x = torch.randint(0, 9, (2, 3))
    s = torch.randn(2, 3, 9, requires_grad=True)
    loss = loss_fn(s, x, torch.randint(0, 9, (2, 3)))
    loss.backward()
    assert s.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert math.isfinite(loss.item())
    # eval mode: dropout off, so two calls agree
    assert torch.equal(loss_fn(s, x, x).detach(), loss_fn(s, x, x).detach())
