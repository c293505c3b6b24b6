"""Magnitude and structured pruning (compress/prune.py)."""

from __future__ import annotations

import torch

from scaletrain.compress.prune import (block_linears, magnitude_prune, make_permanent,
                                       shrink_to, sparsity, structured_param_count,
                                       structured_prune)
from scaletrain.config import build_config
from scaletrain.models import build_model, count_params
from scaletrain.models.gpt import GPT, GPTConfig
from scaletrain.models.registry import REGISTRY

UNITS = REGISTRY["gpt"].prune_units

CFG = GPTConfig(vocab_size=200, seq_len=16, n_layer=2, n_head=4, d_model=64)


def gpt():
    m = GPT(CFG)
    m.init_weights(1)
    return m.eval()


def test_global_magnitude_pruning_hits_the_amount_and_keeps_the_largest():
    m = gpt()
    all_w = torch.cat([mod.weight.detach().abs().flatten() for _, mod in block_linears(m)])
    threshold = all_w.kthvalue(int(0.6 * all_w.numel())).values
    magnitude_prune(m, 0.6)
    make_permanent(m)
    s = sparsity(m)
    assert abs(s["linear_sparsity"] - 0.6) < 1e-3
    for _, mod in block_linears(m):
        assert not hasattr(mod, "weight_orig")  # masks folded in
        kept = mod.weight[mod.weight != 0].abs()
        assert kept.numel() == 0 or kept.min() >= threshold
    assert m.wte.weight.count_nonzero() == m.wte.weight.numel()  # embeddings untouched


def test_structured_pruning_shrinks_to_the_claimed_count_and_runs():
    m = gpt()
    info = structured_prune(m, 0.5, UNITS)
    assert info == {"heads": 2, "d_ff": 128}
    # By hand: per block 3·(32·64 + 32) + (32·64 + 64) + (128·64 + 128) + (128·64 + 64)
    # + 2 LayerNorms 256 = 25184; + wte 12800 + wpe 1024 + ln_f 128
    assert count_params(m) == 2 * 25184 + 12800 + 1024 + 128 < count_params(gpt())
    gpt_cfg = build_config(None, [("model.n_layer", "2"), ("model.n_head", "4"),
                                  ("model.d_model", "64"), ("model.seq_len", "16")])
    assert structured_param_count(gpt_cfg.model, 200, 2, 128) == count_params(m)
    attn = m.blocks["0"].attn
    assert attn.c_attn.weight.shape == (3 * 32, 64) and attn.c_proj.weight.shape == (64, 32)
    out = m(torch.randint(0, 200, (2, 16)))
    assert out.shape == (2, 16, 200) and torch.isfinite(out).all()
    # A fresh model shrunk to the same shapes loads the pruned weights exactly.
    fresh = shrink_to(gpt(), 2, 128, UNITS)
    fresh.load_state_dict(m.state_dict())
    x = torch.randint(0, 200, (2, 16))
    assert torch.equal(fresh(x), m(x))


def test_structured_pruning_keeps_the_important_head():
    m = gpt()
    with torch.no_grad():  # make head 3 of block 0 the loudest, head 0 silent
        wa = m.blocks["0"].attn.c_attn.weight
        for part in range(3):
            wa[part * 64 + 48: part * 64 + 64] *= 10
            wa[part * 64: part * 64 + 16] = 0
    ref = m.blocks["0"].attn.c_attn.weight[48:64].clone()
    structured_prune(m, 0.75, UNITS)  # keep 1 of 4 heads
    assert torch.equal(m.blocks["0"].attn.c_attn.weight[:16], ref)


def test_pruning_nothing_changes_nothing():
    m, ref = gpt(), gpt()
    structured_prune(m, 0.0, UNITS)
    x = torch.randint(0, 200, (2, 16))
    assert torch.equal(m(x), ref(x))


LLAMA = [("model.name", "llama"), ("model.n_layer", "2"), ("model.n_head", "4"),
         ("model.n_kv_head", "2"), ("model.d_model", "32"), ("model.d_ff", "64"),
         ("model.seq_len", "16"), ("model.qkv_bias", "true")]


def test_llama_structured_pruning_keeps_heads_in_whole_kv_groups():
    cfg = build_config(None, LLAMA)
    m = build_model(cfg.model, {"vocab_size": 50}, seed=1).eval()
    units = REGISTRY["llama"].prune_units
    with torch.no_grad():  # kv group 1 (query heads 2, 3; kv head 1) of block 0 the loudest
        attn = m.blocks["0"].self_attn
        attn.q_proj.weight[16:32] *= 10
        attn.k_proj.weight[8:16] *= 10
    loud_q = m.blocks["0"].self_attn.q_proj.weight[16:32].clone()
    loud_k = m.blocks["0"].self_attn.k_proj.weight[8:16].clone()
    assert structured_prune(m, 0.5, units) == {"heads": 2, "d_ff": 32}  # 1 of 2 groups
    attn = m.blocks["0"].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
    assert attn.q_proj.bias.shape == (16,) and attn.o_proj.weight.shape == (32, 16)
    assert torch.equal(attn.q_proj.weight, loud_q) and torch.equal(attn.k_proj.weight, loud_k)
    x = torch.randint(0, 50, (2, 16))
    out = m(x)
    assert out.shape == (2, 16, 50) and torch.isfinite(out).all()
    assert count_params(m) == structured_param_count(cfg.model, 50, 2, 32)
    fresh = shrink_to(build_model(cfg.model, {"vocab_size": 50}, seed=2), 2, 32, units)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.eval()(x), out)


def test_llama_magnitude_pruning_prunes_the_block_linears_only():
    m = build_model(build_config(None, LLAMA).model, {"vocab_size": 50}, seed=1)
    magnitude_prune(m, 0.5)
    make_permanent(m)
    assert abs(sparsity(m)["linear_sparsity"] - 0.5) < 1e-3
    assert {n.rsplit(".", 1)[-1] for n, _ in block_linears(m)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert m.embed_tokens.weight.count_nonzero() == m.embed_tokens.weight.numel()
