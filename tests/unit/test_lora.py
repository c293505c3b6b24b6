"""LoRA converter, freezing and merging (finetune/lora.py)."""

from __future__ import annotations

import pytest
import torch

from scaletrain.finetune.lora import (LoRALinear, adapter_only, apply_lora, freeze, has_lora,
                                      lora_state_dict, merge_lora, trainable_fraction)
from scaletrain.errors import ConfigError
from scaletrain.models.gpt import GPT, GPTConfig


def tiny_gpt(seed=0, d=64, layers=2):
    m = GPT(GPTConfig(vocab_size=300, seq_len=16, n_layer=layers, n_head=2, d_model=d))
    m.init_weights(seed)
    return m.eval()


def test_converted_model_computes_the_base_model_until_trained():
    m = tiny_gpt()
    x = torch.randint(0, 300, (2, 16))
    ref = m(x)
    apply_lora(m, rank=4, alpha=8.0, targets=["c_attn", "c_proj", "c_fc"])
    assert has_lora(m)
    assert torch.equal(m(x), ref)  # B = 0 at init (Hu et al. §4.1)
    n_lora = sum(isinstance(mod, LoRALinear) for mod in m.modules())
    assert n_lora == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block


def test_only_adapters_train_and_are_few():
    m = tiny_gpt(d=128, layers=2)
    apply_lora(m, rank=2, alpha=4.0, targets=["c_attn", "c_proj", "c_fc"])
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    train, total = trainable_fraction(m)
    assert train / total < 0.05
    assert set(lora_state_dict(m)) == set(names)
    assert set(adapter_only(m.state_dict())) == set(names)


def test_merge_gives_the_same_logits():
    m = tiny_gpt()
    apply_lora(m, rank=4, alpha=8.0, targets=["c_attn", "c_fc"])
    with torch.no_grad():  # a trained-looking adapter
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.05)
    x = torch.randint(0, 300, (2, 16))
    before = m(x)
    assert not torch.allclose(before, tiny_gpt()(x), atol=1e-3)  # the adapters matter
    merge_lora(m)
    assert not has_lora(m)
    assert set(m.state_dict()) == set(tiny_gpt().state_dict())  # plain names again
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=0)


def test_lora_gradients_reach_only_adapters():
    m = tiny_gpt().train()
    apply_lora(m, rank=2, alpha=2.0, targets=["c_attn"])
    x = torch.randint(0, 300, (2, 16))
    m(x).sum().backward()
    for n, p in m.named_parameters():
        if n.endswith("lora_A"):
            assert p.grad is None or p.grad.abs().sum() == 0  # B = 0: dL/dA = 0 at init
        elif n.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None


def test_bad_targets_and_patterns_are_config_errors():
    with pytest.raises(ConfigError, match="lora_targets"):
        apply_lora(tiny_gpt(), 2, 2.0, ["q_proj"])
    with pytest.raises(ConfigError, match="blocks.9"):
        freeze(tiny_gpt(), ["blocks.9.*"])


def test_freeze_patterns():
    m = tiny_gpt()
    n = freeze(m, ["wte.*", "blocks.0.*"])
    assert n > 0
    for name, p in m.named_parameters():
        assert p.requires_grad == (not (name.startswith("wte") or name.startswith("blocks.0.")))


def test_llama_lora_targets_the_family_names_and_merges():
    from scaletrain.models.llama import Llama, LlamaConfig

    def tiny_llama():
        m = Llama(LlamaConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=4, n_kv_head=2,
                              d_model=32, d_ff=64, qkv_bias=True))
        m.init_weights(0)
        return m.eval()

    m = tiny_llama()
    x = torch.randint(0, 300, (2, 16))
    ref = m(x)
    apply_lora(m, rank=2, alpha=4.0, targets=["q_proj", "v_proj"])
    wrapped = sorted(n for n, mod in m.named_modules() if isinstance(mod, LoRALinear))
    assert wrapped == [f"blocks.{i}.self_attn.{p}" for i in "01" for p in ("q_proj", "v_proj")]
    assert torch.equal(m(x), ref)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.05)
    before = m(x)
    torch.testing.assert_close(merge_lora(m)(x), before, atol=1e-5, rtol=0)
    assert set(m.state_dict()) == set(tiny_llama().state_dict())
    # A GPT name on a llama: the error lists the llama's own layers.
    with pytest.raises(ConfigError, match="q_proj.*up_proj|gate_proj.*q_proj"):
        apply_lora(tiny_llama(), 2, 2.0, ["c_attn"])


def test_a_model_converted_on_meta_loads_trained_weights_into_its_base():
    """The trainer's order (finetune/init_from.py `converter`, then `apply_init`): LoRA
    on the meta model, allocate, load the plain weights into the base under their plain
    names, draw the adapters. The result computes the plain model (B = 0), and A is the
    same draw per (seed, name) whatever the global RNG did before: every layout (one
    process, DDP, FSDP2 shards) gets the same adapters."""
    from scaletrain.finetune.init_from import load_into
    from scaletrain.finetune.lora import init_adapters

    plain = tiny_gpt(seed=3)
    x = torch.randint(0, 300, (2, 16))

    def converted(rng_seed: int):
        with torch.device("meta"):
            m = GPT(GPTConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=64))
        apply_lora(m, rank=4, alpha=8.0, targets=["c_attn", "c_fc"])
        m.to_empty(device="cpu")
        stored = {k: v for k, v in plain.state_dict().items() if k != "lm_head.weight"}
        load_into(m, stored, "test", (("lm_head.weight", "wte.weight"),))  # tied: once
        torch.manual_seed(rng_seed)  # the global stream must not reach the adapters
        init_adapters(m, seed=7)
        return m.eval()

    a, b = converted(0), converted(1)
    torch.testing.assert_close(a(x), plain(x), atol=0, rtol=0)
    layer = a.blocks["0"].attn.c_attn
    assert torch.equal(layer.base.weight, plain.blocks["0"].attn.c_attn.weight)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    bound = 1 / 64 ** 0.5  # kaiming_uniform_(a=sqrt(5)) of fan_in 64: U(-1/8, 1/8)
    assert 0 < layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
