"""Magnitude and structured pruning (compress/prune.py)."""

from __future__ import annotations

import torch

from scaletrain.compress.prune import (block_linears, magnitude_prune, make_permanent,
                                       shrink_to, sparsity, structured_param_count,
                                       structured_prune)
from scaletrain.models import count_params
from scaletrain.models.gpt import GPT, GPTConfig

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
    info = structured_prune(m, 0.5)
    assert info == {"heads": 2, "d_ff": 128}
    assert count_params(m) == structured_param_count(CFG, 2, 128) < count_params(gpt())
    attn = m.blocks["0"].attn
    assert attn.c_attn.weight.shape == (3 * 32, 64) and attn.c_proj.weight.shape == (64, 32)
    out = m(torch.randint(0, 200, (2, 16)))
    assert out.shape == (2, 16, 200) and torch.isfinite(out).all()
    # A fresh model shrunk to the same shapes loads the pruned weights exactly.
    fresh = shrink_to(gpt(), 2, 128)
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
    structured_prune(m, 0.75)  # keep 1 of 4 heads
    assert torch.equal(m.blocks["0"].attn.c_attn.weight[:16], ref)


def test_pruning_nothing_changes_nothing():
    m, ref = gpt(), gpt()
    structured_prune(m, 0.0)
    x = torch.randint(0, 200, (2, 16))
    assert torch.equal(m(x), ref(x))
