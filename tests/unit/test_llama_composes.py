"""The llama family (models/llama.py) with the single-process techniques the GPT is
checked with: activation checkpointing in every mode (full, selective, every k-th,
budget) gives the gradients of none (fp64), gradient accumulation is the one-big-batch
step (fp64), every precision mode trains (its losses near fp32's), and compile (per
block with selective AC, and the whole model) gives eager's losses through the trainer.
Grouped-query attention with q/k/v biases and qk-norm (the widest block)."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer
from scaletrain.optim.step_end import StepEnd
from scaletrain.parallel.ac import ACPolicy, apply_ac
from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import IGNORE_INDEX, sum_cross_entropy
from scaletrain.train.step import StepOptions, split_micro_batches, train_step
from tests.conftest import make_cfg
from tests.unit.test_compile import losses as trainer_losses

V, T, B = 61, 12, 8
LLAMA = dict(name="llama", n_layer=3, n_head=4, n_kv_head=2, d_model=16, seq_len=T,
             qkv_bias=True, qk_norm=True)
LLAMA_ARGS = ["--model.name=llama", "--model.n_head=4", "--model.n_kv_head=2",
              "--model.qk_norm=true", "--model.tie_embeddings=true"]


def llama(dtype=torch.float64, **kw):
    return build_model(ModelConfig(**{**LLAMA, **kw}), {"vocab_size": V}, seed=0,
                       dtype=dtype).train()


def batch(step: int, masked: bool = True):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    if masked:  # unequal target counts per sample (and so per micro-batch)
        for i in range(B):
            y[i, T - int(1.5 * i):] = IGNORE_INDEX
    return x, y


def grads(model) -> dict:
    x, y = batch(0)
    model.zero_grad()
    sum_cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", [
    ACPolicy("full"), ACPolicy("selective"), ACPolicy("full", 2), ACPolicy("selective", 2),
    ACPolicy("budget", budget_bytes=5.0, block_bytes={"none": 3.0, "selective": 1.0,
                                                      "full": 0.5})],
    ids=["full", "selective", "full-every-2", "selective-every-2", "budget"])
def test_activation_checkpointing_gives_the_gradients_of_none(policy):
    ref = grads(llama())
    model = llama()
    modes = apply_ac(model, policy)
    assert len(modes) == 3 and any(m != "none" for m in modes)
    got = grads(model)
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-12


def test_activation_checkpointing_is_accepted_for_llama_and_refused_without_blocks():
    from scaletrain.config.checks import check_parallel
    from scaletrain.errors import ConfigError

    ac = ["--parallel.activation_checkpoint=full"]
    check_parallel(make_cfg(ac + LLAMA_ARGS), 1)  # no error: llama has blocks
    with pytest.raises(ConfigError, match="needs a model family with transformer blocks"):
        make_cfg(ac + ["--data.source=digits", "--model.name=mlp"])


def _train(k: int, steps: int = 4) -> torch.Tensor:
    model = llama()
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1))
    policy = PrecisionPolicy("fp64", torch.device("cpu"))
    for s in range(steps):
        train_step(model, split_micro_batches(batch(s), B // k), opt, policy, None,
                   StepOptions())
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_accumulation_equals_one_batch():
    ref = _train(1)
    for k in (2, 4):
        assert (_train(k) - ref).abs().max().item() <= 1e-10, k


def _precision_losses(name: str, steps: int = 12) -> list[float]:
    """Losses of `steps` AdamW steps under precision mode `name` on a learnable task
    (each target is the next token id), from the same seeded weights."""
    policy = PrecisionPolicy(name, torch.device("cpu"))
    model = llama(dtype=policy.param_dtype, tie_embeddings=True)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=3e-3),
                          master_weights=name == "bf16-pure")
    scaler = policy.make_scaler()
    out = []
    for s in range(steps):
        x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(s))
        x = (x[:, :1] + torch.arange(T)) % V
        y = (x + 1) % V
        r = train_step(model, split_micro_batches((x, y), 4), opt, policy, scaler,
                       StepOptions(), end=StepEnd(grad_clip=1.0))
        out.append(float(r.loss))
    return out


def test_every_precision_mode_trains_near_fp32():
    ref = _precision_losses("fp32")
    assert ref[-1] < 0.9 * ref[0]  # it learns
    assert _precision_losses("fp64") == pytest.approx(ref, rel=1e-5)
    for name in ("bf16", "fp16", "bf16-pure"):
        got = _precision_losses(name)
        assert got[-1] < 0.9 * got[0], name
        assert got == pytest.approx(ref, rel=0.03), name


@pytest.mark.parametrize("scope,ac", [("blocks", "selective"), ("model", "none")])
def test_compile_matches_eager_losses(tiny_args, tmp_path, scope, ac):
    extra = [*LLAMA_ARGS, f"--parallel.activation_checkpoint={ac}"]
    eager, _ = trainer_losses(tiny_args, tmp_path, "eager", extra)
    comp, s = trainer_losses(tiny_args, tmp_path, "compiled", extra + [
        "--train.compile=true", f"--train.compile_scope={scope}"])
    assert len(eager) == len(comp) == 3
    assert comp == pytest.approx(eager, rel=1e-4)
    assert s["compile_s"] is not None
