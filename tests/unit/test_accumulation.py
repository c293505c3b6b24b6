"""Gradient accumulation is exactly the one-big-batch step, even with unequal target
counts per micro-batch; a mean of per-micro-batch means is not (and this test sees it).

float64, so that a real difference (~1e-3 relative for mean-of-means) is not hidden in
float32 rounding; two correct orderings of the same sums differ by ~1e-15 here.
"""


import pytest
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import IGNORE_INDEX, sum_cross_entropy
from scaletrain.train.step import StepOptions, split_micro_batches, train_step

V, T, B = 61, 12, 8


def make_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    # Mask a different number of positions in each sample: sample i keeps T - 1.5*i targets.
    for i in range(B):
        y[i, T - int(1.5 * i):] = IGNORE_INDEX
    return x, y


def run(k: int, optim: str, steps: int = 5, mean_of_means: bool = False):
    model = build_model(ModelConfig(n_layer=2, n_head=2, d_model=16, seq_len=T),
                        {"vocab_size": V}, seed=0, dtype=torch.float64)
    opt = build_optimizer(model, OptimConfig(name=optim, lr=1e-2, weight_decay=0.1))
    policy = PrecisionPolicy("fp64", torch.device("cpu"))
    for s in range(steps):
        micro = split_micro_batches(make_batch(s), B // k)
        if mean_of_means:
            for x, y in micro:
                logits = model(x)
                n = (y != IGNORE_INDEX).sum()
                (sum_cross_entropy(logits, y) / n / k).backward()
            opt.step()
            opt.zero_grad()
        else:
            train_step(model, micro, opt, policy, None, StepOptions())
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_batch(k, optim):
    ref = run(1, optim)
    got = run(k, optim)
    assert (ref - got).abs().max().item() <= 1e-10


def test_mean_of_means_fails_the_same_check():
    ref = run(1, "adamw")
    wrong = run(4, "adamw", mean_of_means=True)
    assert (ref - wrong).abs().max().item() > 1e-6


def test_step_reports_mean_loss_over_all_targets():
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=T),
                        {"vocab_size": V}, seed=0, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = make_batch(0)
    with torch.no_grad():
        expected = sum_cross_entropy(model(x), y) / (y != IGNORE_INDEX).sum()
    res = train_step(model, split_micro_batches((x, y), 2), opt,
                     PrecisionPolicy("fp64", torch.device("cpu")), None, StepOptions())
    assert abs(res.loss.item() - expected.item()) < 1e-12
    assert int(res.n_targets) == int((y != IGNORE_INDEX).sum())
