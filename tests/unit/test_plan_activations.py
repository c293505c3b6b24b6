"""The plan's per-block activation bytes (plan/activations.py, measured on fake tensors)
against the tensors a LIVE block keeps for its backward, for every registered text
family, AC mode and precision; and the plan follows a change to the model.

Live counts, on real CPU tensors at a micro-batch (3 samples) the plan did not measure
at (it measures at 2 and 4 and extrapolates per token):
- AC none: `saved_tensors_hooks` on the block's forward, one count per storage
  (data_ptr), parameters excluded;
- selective / full (the block checkpointed as parallel/ac.py does): the net bytes the
  forward leaves allocated (torch.profiler memory events; the checkpoint hides its
  saved tensors from outer hooks), minus the block's output, plus its input, which the
  checkpoint keeps (it existed before the forward, so it allocates nothing).
Both include, under bf16 autocast, the weight casts autocast caches (the plan's fixed
bytes). Exact equality: every byte is a tensor's storage size, no estimate. Two known
terms the plan leaves out (a few KiB per block, whatever the batch) are added to it
here: under AC the checkpoint's saved CPU RNG state (`torch.get_rng_state()`, 5056 B),
and under autocast the cached bf16 casts of the Linear biases (autocast caches every
leaf's cast until the forward ends; addmm does not save the bias, so no hook sees it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from scaletrain.config import build_config
from scaletrain.models import registry
from scaletrain.models.gpt import GPT, Block
from scaletrain.parallel.ac import _checkpointed, _selective_context
from scaletrain.plan.activations import block_activations
from scaletrain.precision import PrecisionPolicy
from torch.utils.checkpoint import noop_context_fn

TEXT = sorted(n for n, s in registry.REGISTRY.items() if s.kind == "text")
SAMPLES = 3
SHAPE = ["model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.seq_len=8",
         "model.vocab_size=32"]


def model_cfg(name: str):
    return build_config(None, [tuple(a.split("=", 1)) for a in
                               (f"model.name={name}", *SHAPE)]).model


def live_block(spec, m, precision: str):
    """The family's block 0 and its inputs, real CPU tensors in the run's dtype."""
    policy = PrecisionPolicy(precision, torch.device("cpu"))
    with torch.device("meta"):
        model = spec.build(m, {"vocab_size": m.vocab_size})
        block, inputs = spec.activation_block(model, SAMPLES, m.seq_len)
    block = block.to_empty(device="cpu").to(policy.param_dtype).train()
    g = torch.Generator().manual_seed(0)
    for p in block.parameters():
        p.data.normal_(0.0, 0.02, generator=g)
    real = tuple(torch.randn(x.shape, generator=g).to(policy.param_dtype).requires_grad_()
                 for x in inputs)
    return block, real, policy


def saved_by_hooks(block, inputs, policy) -> int:
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), policy.autocast():
        block(*inputs)
    return sum(seen.values())


def kept_by_checkpoint(block, inputs, policy, mode: str) -> int:
    context_fn = _selective_context if mode == "selective" else noop_context_fn
    run = _checkpointed(block.forward, context_fn)  # as parallel/ac.py apply_ac wraps it
    with policy.autocast():
        run(*inputs)  # warm-up: one-time allocations are not the forward's
    with policy.autocast():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = run(*inputs)
        net = sum(e.self_cpu_memory_usage for e in prof.events())
    return net - out.untyped_storage().nbytes() + sum(x.untyped_storage().nbytes()
                                                       for x in inputs)


def live_bytes(spec, m, precision: str, mode: str) -> int:
    block, inputs, policy = live_block(spec, m, precision)
    if mode == "none":
        return saved_by_hooks(block, inputs, policy)
    bias_casts = sum(mod.bias.numel() * 2 for mod in block.modules()
                     if isinstance(mod, nn.Linear) and mod.bias is not None)
    unplanned = torch.get_rng_state().nbytes + (bias_casts if precision == "bf16" else 0)
    return kept_by_checkpoint(block, inputs, policy, mode) - unplanned


def planned_bytes(m, precision: str, mode: str) -> float:
    a = block_activations(m, precision, mode)
    return a.per_token() * SAMPLES * m.seq_len + sum(a.fixed_bytes())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("family", TEXT)
def test_plan_block_bytes_equal_a_live_blocks_saved_tensors(family, mode, precision):
    m = model_cfg(family)
    spec = registry.REGISTRY[family]
    assert spec.activation_block is not None, f"{family}: a text family must declare it"
    assert planned_bytes(m, precision, mode) == live_bytes(spec, m, precision, mode)


class _BlockSavingMore(Block):
    """A GPT block whose MLP output goes through a sigmoid gate: one more (B, T, D)
    tensor saved for the backward (the gate's output, saved by the multiply)."""

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = self.mlp(self.ln_2(x))
        return x + h * torch.sigmoid(h)


class _GPTSavingMore(GPT):
    def __init__(self, c):
        super().__init__(c)
        self.blocks = nn.ModuleDict({k: _BlockSavingMore(c) for k in self.blocks})


def test_the_plan_follows_a_change_to_the_model(monkeypatch):
    """A block that saves more: the plan sees it (and still equals the live count); the
    formula memory.py used to hold, D·(2r + 14ab) + 4H + 16 per token, did not."""
    gpt = registry.REGISTRY["gpt"]

    def build(m, facts):
        return _GPTSavingMore(registry._build_gpt(m, facts).config)

    spec = dataclasses.replace(gpt, name="gpt-saving-more", build=build)
    monkeypatch.setitem(registry.REGISTRY, "gpt-saving-more", spec)
    base = model_cfg("gpt")
    more = dataclasses.replace(base, name="gpt-saving-more")
    D, H = base.d_model, base.n_head
    old_formula = D * (2 * 4 + 14 * 4) + 4 * H + 16
    assert block_activations(base, "fp32", "none").per_token() == old_formula
    # +2 (B, T, D) fp32 tensors: the multiply saves h and sigmoid(h) (sigmoid saves its
    # output, the same storage as the latter)
    got = block_activations(more, "fp32", "none").per_token()
    assert got == old_formula + 2 * 4 * D
    assert planned_bytes(more, "fp32", "none") == live_bytes(spec, more, "fp32", "none")


# An MoE llama (model.name="llama" with model.moe_experts > 0: the same family, so TEXT
# covers its dense blocks; this covers its MoE block). The plan runs it on fake tensors
# with an even split over the experts (models/moe.py segment_sizes); the live block routes
# its random tokens unevenly: the saved bytes depend on the routed rows only.
MOE = ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_d_ff=8",
       "model.moe_shared_experts=1", "model.moe_aux_loss=0.01", "model.moe_z_loss=0.001"]


# AC mode "none" only: activation checkpointing is refused with MoE layers for now
# (parallel/moe_checks.py); under it the plan misses the layer's few-byte statistics
# (MoE.last) and counts bf16 casts of the 3-D expert weights that autocast does not
# cache (it casts per-expert views, not the leaf).
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])  # its bias is a buffer
def test_plan_block_bytes_of_an_moe_block(mode, precision, router):
    m = build_config(None, [tuple(a.split("=", 1)) for a in
                            ("model.name=llama", *SHAPE, *MOE,
                             f"model.moe_router={router}")]).model
    spec = registry.spec_of(m)
    with torch.device("meta"):
        block, _ = spec.activation_block(spec.build(m, {"vocab_size": 32}), 1, m.seq_len)
    assert type(block.mlp).__name__ == "MoE"
    assert planned_bytes(m, precision, mode) == live_bytes(spec, m, precision, mode)
