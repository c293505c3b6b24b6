"""The MoE feed-forward (models/moe.py) against a naive per-token reference, its routers,
drops, the balancing bias, its losses under accumulation, and the llama family with it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaletrain.config.schema import ModelConfig, OptimConfig
from scaletrain.models import build_model, spec_of
from scaletrain.models.moe import (MoE, MoeSettings, dispatch, expert_dtype, grouped_matmul,
                                   route, use_grouped_mm)
from scaletrain.models.moe_terms import moe_step_terms
from scaletrain.optim import build_optimizer
from scaletrain.metrics.sinks import TensorBoardSink
from scaletrain.optim.step_end import StepEnd
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.step import StepOptions, split_micro_batches, train_step
from scaletrain.train.step_loss import build_step_loss

D, E, FF = 8, 6, 12


def layer(settings: MoeSettings, seed: int = 0, dtype=torch.float64) -> MoE:
    m = MoE(D, settings).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return m


def naive(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: its router weights, its top-k experts, each expert's SwiGLU."""
    s, w = m.settings, m.experts
    out = torch.zeros_like(x.reshape(-1, D))
    for t, xt in enumerate(x.reshape(-1, D)):
        logits = m.gate.weight @ xt
        if s.router == "softmax":
            probs = logits.softmax(-1)
            top = probs.topk(s.top_k).indices
            weights = probs[top]
        else:
            scores = logits.sigmoid()
            top = (scores + m.expert_bias).topk(s.top_k).indices
            weights = scores[top]
        if s.norm_topk_prob:
            weights = weights / weights.sum()
        for e, we in zip(top.tolist(), weights):
            h = F.silu(xt @ w.gate_proj[e]) * (xt @ w.up_proj[e])
            out[t] += we * (h @ w.down_proj[e])
    return out.view_as(x)


@pytest.mark.parametrize("router,norm", [("softmax", True), ("softmax", False),
                                         ("sigmoid_bias", True), ("sigmoid_bias", False)])
def test_layer_equals_per_token_reference(router, norm):
    m = layer(MoeSettings(E, 2, FF, router=router, norm_topk_prob=norm))
    if router == "sigmoid_bias":  # a bias that changes the choice, not the weights
        m.expert_bias.copy_(torch.linspace(-0.3, 0.3, E, dtype=torch.float64))
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert (m(x) - naive(m, x)).abs().max().item() < 1e-12


def test_mixtral_routing_is_softmax_over_the_top_k_logits():
    logits = torch.randn(7, E, dtype=torch.float64)
    w, experts, _ = route(logits, MoeSettings(E, 2, FF), None)
    top = logits.topk(2).values.softmax(-1)
    assert (w - top).abs().max().item() < 1e-15
    assert (experts == logits.topk(2).indices).all()


def test_no_token_is_dropped_by_default():
    m = layer(MoeSettings(E, 2, FF)).train()
    # Every token routed to expert 0 first: maximal skew, still nothing dropped.
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[0] = 10.0
    x = torch.rand(2, 8, D, dtype=torch.float64) + 0.1
    assert (m(x) - naive(m, x)).abs().max().item() < 1e-12
    assert m.last.dropped.item() == 0 and m.last.load[0].item() == 16


def test_capacity_drops_and_counts_the_overflow():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])  # expert 0: 4 assignments
    d = dispatch(experts, 4, capacity=2)
    assert d.dropped.item() == 2 and d.counts.tolist() == [2, 2, 1, 1]
    assert sorted(d.tokens.tolist()) == [0, 0, 1, 1, 2, 3]  # tokens 2, 3 lose expert 0
    # The layer: capacity ceil(1.0 * 16 * 2 / 6) = 6; dropped assignments add nothing.
    m = layer(MoeSettings(E, 2, FF, capacity_factor=1.0)).train()
    with torch.no_grad():
        m.gate.weight[0] += 5.0
    x = torch.rand(2, 8, D, dtype=torch.float64) + 0.1
    y = m(x)
    assert m.last.dropped.item() > 0
    flat = x.reshape(-1, D)
    w, ex, _ = route(m.gate(flat), m.settings, None)
    d = dispatch(ex, E, m.capacity(16))
    kept = torch.zeros(16 * 2, dtype=torch.bool)
    kept[d.order] = True
    ref = naive(layer(MoeSettings(E, 2, FF)), x)  # same weights (same seed), no capacity
    assert kept.sum().item() == 32 - m.last.dropped.item()
    assert (y - ref).abs().max().item() > 1e-3  # something was really dropped


def test_grouped_mm_matches_the_segment_loop():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 8, generator=g), torch.randn(3, 8, 16, generator=g)
    counts = torch.tensor([4, 0, 6])
    try:
        got = grouped_matmul(x, w, counts, grouped=True)
    except RuntimeError as e:  # not provided for this device / dtype
        pytest.skip(str(e))
    ref = grouped_matmul(x, w, counts, grouped=False)
    assert (got - ref).abs().max().item() < 1e-5


def test_expert_matmuls_take_autocasts_dtype():
    # bf16 training under autocast keeps the rows in fp32: the grouped kernel must be
    # chosen from autocast's dtype, or a CUDA run under autocast would never take it
    x = torch.randn(4, 8)
    assert expert_dtype(x) == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        assert expert_dtype(x) == torch.bfloat16
    assert expert_dtype(x.double()) == torch.float64


def test_grouped_mm_only_where_its_kernel_runs():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    assert use_grouped_mm("cuda", torch.bfloat16, 64, 32)
    assert not use_grouped_mm("cuda", torch.float32, 64, 32)  # CUDA: bf16 only
    assert use_grouped_mm("cpu", torch.bfloat16, 64, 32)
    assert not use_grouped_mm("cpu", torch.float32, 64, 32)  # its meta function: bf16 only
    assert not use_grouped_mm("cpu", torch.float64, 64, 32)  # no fp64 kernel
    assert not use_grouped_mm("cpu", torch.bfloat16, 60, 32)  # 120 B rows: not 16-aligned
    assert not use_grouped_mm("cpu", torch.bfloat16, 64, 36)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_gradients_equal_the_segment_loops(dtype):
    # fp32 forced (grouped=True): the CPU kernel runs it eagerly, the same products
    # an expert with no rows, uneven segments; the output gradient as the combine makes
    # it (dense), since the CPU kernel refuses a zero-stride one
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g).to(dtype).requires_grad_()
    w = torch.randn(3, 8, 16, generator=g).to(dtype).requires_grad_()
    counts, go = torch.tensor([4, 0, 6]), torch.randn(10, 16, generator=g).to(dtype)
    got = torch.autograd.grad(grouped_matmul(x, w, counts, grouped=True), (x, w), go)
    ref = torch.autograd.grad(grouped_matmul(x, w, counts, grouped=False), (x, w), go)
    tol = 0 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, ref):
        assert (a.float() - b.float()).abs().max().item() <= tol


def test_bias_update_moves_a_skewed_load_toward_balance():
    m = layer(MoeSettings(E, 2, FF, router="sigmoid_bias")).train()
    with torch.no_grad():
        m.gate.weight[0] += 1.0  # expert 0 favoured by every token
    terms = moe_step_terms(m, lambda t: t, bias_rate=0.05)
    x = torch.rand(4, 16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def imbalance() -> float:
        m(x)
        terms.collect()
        terms.end_step(applied=True)
        return terms.record()["moe_imbalance"][next(iter(terms.record()["moe_imbalance"]))]

    first = imbalance()
    for _ in range(30):
        last = imbalance()
    assert first > 1.5 and last < first - 0.5, (first, last)
    assert m.expert_bias[0] < 0  # the favoured expert's bias went down
    # A skipped step leaves the bias alone.
    before = m.expert_bias.clone()
    m(x)
    terms.collect()
    terms.end_step(applied=False)
    assert torch.equal(before, m.expert_bias)


V, T, B = 37, 8, 8
MOE = dict(name="llama", n_layer=3, n_head=2, d_model=16, seq_len=T, moe_experts=4,
           moe_top_k=2, moe_d_ff=8, moe_shared_experts=1, moe_first_dense=1,
           moe_aux_loss=0.1, moe_z_loss=0.01)


def run_steps(k: int, router: str, steps: int = 3) -> tuple:
    m = ModelConfig(**MOE, moe_router=router)
    model = build_model(m, {"vocab_size": V}, seed=0, dtype=torch.float64)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1))
    policy = PrecisionPolicy("fp64", torch.device("cpu"))
    terms = moe_step_terms(model, lambda t: t, bias_rate=0.01)
    loss = build_step_loss()
    loss = type(loss)(loss.on_logits, extra=terms.collect)
    end = StepEnd(after_step=terms.end_step)
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        r = train_step(model, split_micro_batches((x, y), B // k), opt, policy, None,
                       StepOptions(), step_loss=loss, end=end)
        losses.append(r.loss.item())
    state = torch.cat([t.detach().flatten() for t in model.state_dict().values()])
    return state, losses, terms.record()


@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_accumulation_with_moe_losses_is_the_large_batch_step(router):
    ref, ref_losses, ref_rec = run_steps(1, router)
    got, losses, rec = run_steps(4, router)
    assert (ref - got).abs().max().item() <= 1e-10
    assert ref_rec["moe_aux_loss"] == pytest.approx(rec["moe_aux_loss"], abs=1e-12)
    assert ref_rec["moe_imbalance"] == rec["moe_imbalance"]
    # The logged loss is the cross-entropy alone: near ln V for a fresh model, the aux
    # terms (aux ~ top_k = 2 per layer × 0.1) not in it.
    assert abs(ref_losses[0] - math.log(V)) < 0.1


def test_moe_terms_change_the_gradient_not_the_logged_loss():
    """Without the aux terms in the gradient the parameters differ (the test above
    would see a step that dropped them)."""
    m = ModelConfig(**MOE)
    model = build_model(m, {"vocab_size": V}, seed=0, dtype=torch.float64)
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    policy = PrecisionPolicy("fp64", torch.device("cpu"))
    grads = []
    for extra in (True, False):
        model.zero_grad()
        terms = moe_step_terms(model, lambda t: t, 0.0)
        loss = build_step_loss()
        loss = type(loss)(loss.on_logits, extra=terms.collect if extra else (lambda: None))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        r = train_step(model, [(x, x)], opt, policy, None, StepOptions(), step_loss=loss,
                       end=StepEnd(grad_clip=0.0))
        grads.append(r.loss.item())
        grads.append(r.grad_norm.item())
    assert grads[0] == grads[2]  # same logged loss
    assert grads[1] != grads[3]  # different gradient


def test_family_facts_count_activated_parameters():
    m = ModelConfig(**MOE)
    model = build_model(m, {"vocab_size": V}, seed=0)
    assert [type(b.mlp).__name__ for b in model.blocks.values()] == ["SwiGLU", "MoE", "MoE"]
    assert model.blocks["1"].mlp.experts.gate_proj.shape == (4, 16, 8)
    spec = spec_of(m)
    dense_matmul = sum(p.numel() for n, p in model.named_parameters()
                       if n.endswith(".weight") and "norm" not in n
                       and not n.startswith("embed_tokens"))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    attention = 12 * 3 * 2 * 8 * T
    assert spec.flops_per_token(model, T) == 6 * (dense_matmul + experts * 2 / 4) + attention


def test_tensorboard_gets_per_block_imbalance_and_load_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sink.write({"kind": "train", "step": 3, "loss": 1.0, "moe_imbalance": {"1": 1.5},
                "moe_load": {"1": [3, 0, 1, 4]}})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert acc.Scalars("train/moe_imbalance/1")[0].value == 1.5
    h = acc.Histograms("train/moe_load/1")[0].histogram_value
    assert list(h.bucket) == [3, 0, 1, 4] and h.num == 8
