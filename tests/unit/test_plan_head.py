"""The unchunked head's peak, measured: the (tokens, V) tensors `plan` counts for the
head + cross-entropy (models/losses.py `cross_entropy_peak_tensors`, used by
plan/memory.py `head_bytes` / `eval_head_bytes` and plan/cpu_rss.py) are what is alive
at the peak of the family's own head + loss (forward and backward, as the step runs
it) and of the evaluator, read off torch.profiler's allocation events in time order.

The shape makes the (tokens, V) tensors nearly everything: 256 tokens x V 4099 against
d_model 8, so the other tensors alive at the peak (the head weight's bf16 cast, the
normed input, attention's no-grad scores in evaluation) stay below 0.1 B per logit."""

from __future__ import annotations

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from scaletrain.config import build_config
from scaletrain.evaluate.evaluator import evaluate
from scaletrain.models import build_model
from scaletrain.plan.memory import RankShape, dtype_bytes, eval_head_bytes, head_bytes
from scaletrain.precision import PrecisionPolicy

B, T, D, V = 4, 64, 8, 4099
N = B * T
# what else is alive at the peak, per logit: the bf16 weight cast 2·D / N = 0.06 B;
# the old count (the logits + 3 fp32) was 2 B (bf16) and 4 B (fp32) per logit above
TOLERANCE = 0.25 * N * V


def cfg_of(family: str, precision: str):
    return build_config(None, [("model.name", family), ("model.n_layer", "1"),
                               ("model.d_model", str(D)), ("model.n_head", "1"),
                               ("model.seq_len", str(T)), ("model.vocab_size", str(V)),
                               ("precision.dtype", precision), ("train.device", "cpu")])


def shape() -> RankShape:
    """One rank's head: a micro-batch and an evaluation batch of N tokens."""
    return RankShape(params=0.0, largest_param=0.0, layers=1, tokens=N, in_flight=1,
                     has_head=True, vocab_local=V, tp=1, accum=1, ddp=False, eval_tokens=N)


def peak_allocated(fn) -> int:
    """Peak bytes allocated during `fn()` above what was allocated before it: the
    running sum of the CPU allocator's events (torch.profiler), in time order."""
    fn()  # warm-up: one-time allocations (kernel caches, autocast state) are not fn's
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def model_and_batch(family: str, precision: str):
    cfg = cfg_of(family, precision)
    policy = PrecisionPolicy(precision, torch.device("cpu"))
    model = build_model(cfg.model, {"vocab_size": V}, seed=0,
                        dtype=policy.param_dtype).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    return cfg, policy, model, x, y


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_head_peak_is_what_plan_counts(family, precision):
    """The head + loss's forward and backward from the final hidden states, as the step
    runs them (the model's `head_loss` under the run's autocast, then backward): plan's
    `head_bytes`, three fp32 (tokens, V) tensors in both dtypes."""
    cfg, policy, model, _, y = model_and_batch(family, precision)
    h = torch.randn(B, T, D, dtype=policy.param_dtype, requires_grad=True)

    def step():
        with policy.autocast():
            loss = model.head_loss(h, y)
        loss.backward()
        h.grad = None
        model.zero_grad(set_to_none=True)

    measured = peak_allocated(step)
    predicted = head_bytes(cfg, shape(), dtype_bytes(precision)[1])
    assert predicted == N * V * 12  # log_softmax's output + 2 fp32 gradients
    assert abs(measured - predicted) <= TOLERANCE, \
        f"measured {measured / (N * V):.2f} B per logit, plan {predicted / (N * V):.2f}"


@pytest.mark.parametrize("precision,per_logit", [("fp32", 4 + 4), ("bf16", 2 + 4 + 4)])
def test_evaluation_head_peak_is_what_plan_counts(precision, per_logit):
    """The evaluator (no grad) holds the logits while the cross-entropy upcasts them
    (bf16: an fp32 copy; fp32: none) and log-softmaxes them: plan's `eval_head_bytes`."""
    _, policy, model, x, y = model_and_batch("gpt", precision)

    def run():
        evaluate(model, [(x, y)], policy, torch.device("cpu"), "text")

    measured = peak_allocated(run)
    predicted = eval_head_bytes(shape(), dtype_bytes(precision)[1])
    assert predicted == N * V * per_logit
    assert abs(measured - predicted) <= TOLERANCE, \
        f"measured {measured / (N * V):.2f} B per logit, plan {predicted / (N * V):.2f}"
