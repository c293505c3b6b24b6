"""KV-cache decoding gives the tokens of the no-cache reference (generate.py), for the
GPT and the llama family (its cache holds n_kv_head heads)."""

from __future__ import annotations

import pytest
import torch

from scaletrain.finetune.lora import LoRALinear, apply_lora
from scaletrain.compress.prune import structured_prune
from scaletrain.compress.quantize import load_quantized, quantized_state
from scaletrain.generate import sample
from scaletrain.models import llama as llama_family
from scaletrain.models.gpt import GPT, GPTConfig, forward_cached
from scaletrain.models.llama import Llama, LlamaConfig
from scaletrain.models.registry import REGISTRY

CFG = GPTConfig(vocab_size=97, seq_len=24, n_layer=2, n_head=4, d_model=32, init_std=0.3)
DECODE = REGISTRY["gpt"].decode
# GQA (4 query heads over 2 kv heads), qk-norm, q/k/v bias, tied head, rope scaling.
LCFG = LlamaConfig(vocab_size=97, seq_len=24, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                   d_ff=64, qkv_bias=True, qk_norm=True, tie_embeddings=True,
                   rope_scaling="llama3", rope_original_seq_len=16, init_std=0.3)


def gpt():
    # A large init std gives peaked, varied logits: greedy paths that are not constant.
    m = GPT(CFG)
    m.init_weights(5)
    return m.eval()


def test_cached_logits_equal_full_forward_logits():
    m = gpt()
    ids = torch.randint(0, 97, (1, 20))
    full = m(ids)
    cache = [None] * CFG.n_layer
    first = forward_cached(m, ids[:, :8], cache, 0)
    steps = [forward_cached(m, ids[:, t:t + 1], cache, t) for t in range(8, 20)]
    got = torch.cat([first] + steps, dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def _variants():
    yield "dense", gpt()
    lora = apply_lora(gpt(), 2, 4.0, ["c_attn", "c_fc"])
    with torch.no_grad():
        for mod in lora.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.1)
    yield "lora", lora
    pruned = gpt()
    structured_prune(pruned, 0.25, REGISTRY["gpt"].prune_units)
    yield "structured", pruned
    yield "weight-int4", load_quantized(gpt(), quantized_state(gpt(), "weight-int4", 16),
                                        "weight-int4")


@pytest.mark.parametrize("name, model", list(_variants()), ids=[n for n, _ in _variants()])
def test_greedy_kv_equals_no_cache_past_the_window(name, model):
    prompt = [3, 1, 4, 1, 5]
    # 40 new tokens: past seq_len=24, so the sliding-window fallback is exercised too.
    a = sample(model, prompt, max_new_tokens=40, seq_len=CFG.seq_len, temperature=0,
               decode=DECODE)
    b = sample(model, prompt, max_new_tokens=40, seq_len=CFG.seq_len, temperature=0)
    assert a == b and len(a) == 40
    assert len(set(a)) > 3  # not a degenerate constant path


def test_seeded_sampling_matches_and_stop_token_ends():
    m = gpt()
    kw = dict(max_new_tokens=30, seq_len=CFG.seq_len, temperature=1.0, top_k=10, decode=DECODE)
    a = sample(m, [1, 2], generator=torch.Generator().manual_seed(7), **kw)
    b = sample(m, [1, 2], generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert a == b
    stop = a[5]
    c = sample(m, [1, 2], generator=torch.Generator().manual_seed(7), stop_id=stop, **kw)
    assert c == a[:a.index(stop)]


def test_long_prompt_is_cropped_like_the_reference():
    m = gpt()
    prompt = list(torch.randint(0, 97, (50,)).tolist())
    a = sample(m, prompt, max_new_tokens=5, seq_len=CFG.seq_len, temperature=0, decode=DECODE)
    b = sample(m, prompt, max_new_tokens=5, seq_len=CFG.seq_len, temperature=0, use_cache=False)
    assert a == b


def test_dynamic_int8_cached_logits_are_close():
    # torch.ao dynamic quantization picks activation scales per call, so a one-token
    # call and a whole-context call round differently: close, not bitwise equal.
    m = load_quantized(gpt(), quantized_state(gpt(), "dynamic-int8"), "dynamic-int8")
    ids = torch.randint(0, 97, (1, 12))
    cache = [None] * CFG.n_layer
    first = forward_cached(m, ids[:, :6], cache, 0)
    steps = [forward_cached(m, ids[:, t:t + 1], cache, t) for t in range(6, 12)]
    got = torch.cat([first] + steps, dim=1)
    ref = m(ids)
    quant_error = (ref - gpt()(ids)).abs().max()  # int8 vs fp32, whole-context calls
    assert 0 < (got - ref).abs().max() < 2 * quant_error


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    # logits / T overflowed (and 1e-300 is 0 in fp32): inf/nan probabilities. The limit
    # of sampling as T -> 0 is greedy, and so is what sample() now returns.
    m = gpt()
    greedy = sample(m, [3, 1, 4], max_new_tokens=20, seq_len=CFG.seq_len, temperature=0)
    got = sample(m, [3, 1, 4], max_new_tokens=20, seq_len=CFG.seq_len, decode=DECODE,
                 temperature=temperature, top_k=5, generator=torch.Generator().manual_seed(1))
    assert got == greedy


def llama():
    m = Llama(LCFG)
    m.init_weights(5)
    return m.eval()


def test_every_text_family_declares_its_cached_decode():
    assert REGISTRY["llama"].decode is llama_family.forward_cached
    assert all(spec.decode is not None for spec in REGISTRY.values() if spec.kind == "text")


def test_llama_cached_logits_equal_full_forward_and_cache_holds_kv_heads():
    m = llama()
    ids = torch.randint(0, 97, (1, 20))
    full = m(ids)
    cache = [None] * LCFG.n_layer
    first = REGISTRY["llama"].decode(m, ids[:, :8], cache, 0)
    steps = [REGISTRY["llama"].decode(m, ids[:, t:t + 1], cache, t) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache[0][0].shape == (1, LCFG.n_kv_head, 20, LCFG.d_model // LCFG.n_head)


def _llama_variants():
    yield "dense", llama()
    # Seeded here: lora_A's init and these draws use the global RNG, whose state depends
    # on which tests ran before in the worker, and some draws make greedy decoding repeat
    # one token (the non-vacuity check below then fails).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = apply_lora(llama(), 2, 4.0, ["q_proj", "v_proj", "gate_proj"])
        with torch.no_grad():
            for mod in lora.modules():
                if isinstance(mod, LoRALinear):
                    mod.lora_B.normal_(0, 0.1)
    yield "lora", lora
    pruned = llama()
    structured_prune(pruned, 0.5, REGISTRY["llama"].prune_units)  # 1 of 2 kv groups
    yield "structured", pruned
    yield "weight-int4", load_quantized(llama(), quantized_state(llama(), "weight-int4", 16),
                                        "weight-int4")


@pytest.mark.parametrize("name, model", list(_llama_variants()),
                         ids=[n for n, _ in _llama_variants()])
def test_llama_greedy_kv_equals_no_cache_past_the_window(name, model):
    kw = dict(max_new_tokens=40, seq_len=LCFG.seq_len, temperature=0)
    a = sample(model, [3, 1, 4, 1, 5], decode=REGISTRY["llama"].decode, **kw)
    assert a == sample(model, [3, 1, 4, 1, 5], **kw) and len(set(a)) > 3


def test_serve_decodes_with_the_family_cache():
    from scaletrain.config import build_config
    from scaletrain.serve.server import CompletionService

    cfg = build_config(None, [("model.name", "llama"), ("model.n_layer", "2"),
                              ("model.n_head", "4"), ("model.n_kv_head", "2"),
                              ("model.d_model", "32"), ("model.seq_len", "24")])
    service = CompletionService(llama(), None, cfg, "tiny")
    assert service.decode is llama_family.forward_cached
