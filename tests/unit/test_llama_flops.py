"""llama_flops_per_token (models/llama.py) is what a live model's forward + backward
computes: torch.utils.flop_counter on GQA + SwiGLU shapes, tied and untied heads."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaletrain.models.llama import Llama, LlamaConfig, llama_flops_per_token


@pytest.mark.parametrize("tied, head_dim", [(False, 0), (True, 16)])
def test_llama_flops_per_token_equals_the_flop_counter(tied, head_dim):
    # 8 query heads over 2 kv heads; SwiGLU width 176 (not 4·d); head_dim 16 makes
    # q/o 128 wide on a 64-wide model.
    c = LlamaConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=8, n_kv_head=2,
                    head_dim=head_dim, d_model=64, d_ff=176, qkv_bias=True, qk_norm=True,
                    tie_embeddings=tied)
    model = Llama(c)
    model.init_weights(0)
    x = torch.randint(0, 512, (2, 64))
    # The math SDPA runs attention as bmm's the counter sees (the fused CPU kernel is
    # not counted); like the formula it counts the full T x T scores (PaLM, app. B).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    measured = counter.get_total_flops() / x.numel()
    assert llama_flops_per_token(model, 64) == pytest.approx(measured, rel=0.02)
    assert counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) > 0  # attention in
