"""Quantizers and quantized artefact modules (compress/quantize.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from scaletrain.compress.quantize import (METHODS, DynamicInt8Linear, QLinear, dequantize,
                                          load_quantized, pack_int4, quantize_groups_int4,
                                          quantize_rows_int8, quantized_state, unpack_int4)
from scaletrain.models.gpt import GPT, GPTConfig

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao's notice


def test_int8_rows_error_is_at_most_half_a_step():
    w = torch.randn(8, 64)
    q, s = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and s.shape == (8,)
    err = (dequantize(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()


def test_int4_groups_and_packing_round_trip():
    w = torch.randn(4, 64)
    q, s = quantize_groups_int4(w, 16)
    assert q.min() >= -8 and q.max() <= 7 and s.shape == (4, 4)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(q).numel() == q.numel() // 2
    err = (dequantize(q, s) - w).abs()
    assert (err <= s.repeat_interleave(16, dim=1) / 2 + 1e-6).all()


def _gpt():
    m = GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=64))
    m.init_weights(0)
    return m.eval()


@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_stays_close_and_is_smaller(method):
    m = _gpt()
    x = torch.randint(0, 256, (2, 16))
    state = quantized_state(m, method, group=32)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    dense = sum(t.numel() * 4 for k, t in m.state_dict().items() if k != "lm_head.weight")
    assert dense / nbytes >= (4.5 if method == "weight-int4" else 3.3)
    q = load_quantized(_gpt(), state, method)
    kind = DynamicInt8Linear if method == "dynamic-int8" else QLinear
    assert isinstance(q.blocks["0"].attn.c_attn, kind) and isinstance(q.lm_head, kind)
    with torch.no_grad():
        ref, out = m(x), q(x)
    # Logits of this GPT are O(1); int8 keeps them within a few 1e-3, int4 within 0.1.
    assert (out - ref).abs().max() < (0.1 if method == "weight-int4" else 0.02)
    assert (out - ref).abs().max() > 0  # it really is quantized


@pytest.mark.parametrize("method", METHODS)
def test_llama_quantized_stays_close_and_keeps_the_embedding_rows_int8(method):
    from scaletrain.models.llama import Llama, LlamaConfig

    def tiny_llama():
        m = Llama(LlamaConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=4, n_kv_head=2,
                              d_model=64, d_ff=128, tie_embeddings=True))
        m.init_weights(0)
        return m.eval()

    m = tiny_llama()
    state = quantized_state(m, method, group=32)
    # The token table is read by rows: int8 rows (1 B each), never int4 nibbles.
    assert state["embed_tokens.qweight"].dtype == torch.int8
    assert state["embed_tokens.qweight"].shape == (256, 64)
    q = load_quantized(tiny_llama(), state, method)
    kind = DynamicInt8Linear if method == "dynamic-int8" else QLinear
    assert isinstance(q.blocks["0"].self_attn.k_proj, kind)
    assert isinstance(q.blocks["0"].mlp.gate_proj, kind) and isinstance(q.lm_head, kind)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        err = (q(x) - m(x)).abs().max()
    assert 0 < err < (0.1 if method == "weight-int4" else 0.02)
