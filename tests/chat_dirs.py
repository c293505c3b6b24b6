"""Tiny chat tokenizers, HF model directories and conversations for the chat SFT tests,
built locally by transformers (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tests.hf_dirs import stdlib_bpe

# ChatML as Qwen2.5 writes it: a default system message when the conversation has none,
# a rejected role raised from the template, and the generation prompt.
TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown role: ' + m['role']) }}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven is prime."},
     {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Eleven, also prime!"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour"},
     {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "De rien."}],
]

WORDS = ("the model reads a list of messages and answers each user turn with a short reply "
         "about numbers files python code and the weather today").split()


def chat_tokenizer(d: Path, template: str | None = TEMPLATE):
    """A byte-level BPE with ChatML's control tokens, saved by transformers into `d`
    (tokenizer.json, tokenizer_config.json and the template); returns it."""
    import transformers

    tk = stdlib_bpe(SPECIALS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(d)
    return fast


def qwen_dir(d: Path, template: str | None = TEMPLATE):
    """A tiny Qwen2 model directory with the chat tokenizer; returns (dir, hf model)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=2)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(d)
    chat_tokenizer(d, template)
    return d, model


def random_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` distinct conversations of 1-3 turns, some with a system message."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": f"Rule {i}: {words(3)}."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": f"{words(rng.randint(2, 6))}?"},
                     {"role": "assistant", "content": f"{words(rng.randint(2, 8))}."}]
        out.append(msgs)
    return out


def write_jsonl(path: Path, conversations: list, key: str = "messages") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: c}) + "\n" for c in conversations))
    return path
