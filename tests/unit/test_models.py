"""Models against straightforward reference computations, and their construction rules."""

import math

import pytest
import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.models import GPT, GPTConfig, build_model, count_params


def reference_gpt_forward(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 written out with explicit matmuls and a masked softmax (no SDPA, no modules)."""
    c = m.config
    P = dict(m.named_parameters())
    B, T = idx.shape
    H, D = c.n_head, c.d_model
    Dh = D // H

    def ln(x, pre):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * P[pre + ".weight"] + P[pre + ".bias"]

    def lin(x, pre):
        return x @ P[pre + ".weight"].T + P[pre + ".bias"]

    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(c.n_layer):
        b = f"blocks.{i}"
        h = ln(x, b + ".ln_1")
        q, k, v = lin(h, b + ".attn.c_attn").split(D, dim=-1)
        q, k, v = (t.reshape(B, T, H, Dh).permute(0, 2, 1, 3) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(B, T, D)
        x = x + lin(y, b + ".attn.c_proj")
        h = ln(x, b + ".ln_2")
        u = lin(h, b + ".mlp.c_fc")
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + lin(u, b + ".mlp.c_proj")
    return ln(x, "ln_f") @ P["wte.weight"].T


def tiny_gpt(seed=0, **kw) -> GPT:
    mc = ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16, **kw)
    return build_model(mc, {"vocab_size": 97}, seed=seed, dtype=torch.float64)


def test_gpt_forward_matches_reference():
    m = tiny_gpt().eval()
    # Non-trivial LayerNorm and bias values, so that a mistake in either shows.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(1)) * 0.1)
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    out = m(idx)
    ref = reference_gpt_forward(m, idx)
    assert out.shape == (3, 16, 97)
    assert (out - ref).abs().max().item() < 1e-10


def test_causality():
    m = tiny_gpt().eval()
    idx = torch.randint(0, 97, (1, 16))
    idx2 = idx.clone()
    idx2[0, 10:] = (idx2[0, 10:] + 1) % 97
    assert torch.equal(m(idx)[0, :10], m(idx2)[0, :10])


def test_init_is_deterministic_and_layout_independent():
    a, b = tiny_gpt(seed=3), tiny_gpt(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = tiny_gpt(seed=4)
    assert not torch.equal(a.wte.weight, c.wte.weight)
    # A model that lost its first block (a pipeline stage) keeps the same values per name.
    with torch.device("meta"):
        stage = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, seq_len=16))
    del stage.blocks["0"]
    stage.to_empty(device="cpu")
    stage.tie_weights()
    stage.init_weights(3)
    full = dict(a.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p.double(), full[name]), name


def test_weights_tied_and_param_names_map_to_gpt2():
    m = tiny_gpt()
    assert m.lm_head.weight is m.wte.weight
    names = set(dict(m.named_parameters()))
    assert "blocks.1.attn.c_attn.weight" in names and "blocks.0.mlp.c_fc.bias" in names
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} <= names


def test_init_statistics():
    m = build_model(ModelConfig(n_layer=4, d_model=128), {"vocab_size": 1000}, seed=0)
    assert abs(m.wte.weight.std().item() - 0.02) < 1e-3
    proj_std = m.blocks["0"].mlp.c_proj.weight.std().item()
    assert abs(proj_std - 0.02 / math.sqrt(8)) < 1e-3
    assert torch.all(m.blocks["0"].ln_1.weight == 1)


def test_dropout_only_in_training():
    m = tiny_gpt(dropout=0.5)
    idx = torch.randint(0, 97, (2, 16))
    m.eval()
    assert torch.equal(m(idx), m(idx))
    m.train()
    assert not torch.equal(m(idx), m(idx))


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_vision_models(name):
    m = build_model(ModelConfig(name=name), {"input_shape": (1, 8, 8), "num_classes": 10},
                    seed=0)
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert count_params(m) > 1000
