"""Tiny Hugging Face model directories for the interop tests (llama and MoE families),
built locally by transformers (no downloads): a seeded random `<arch>ForCausalLM` saved by
`save_pretrained`, with a byte-level BPE tokenizer carrying Llama 3's special tokens."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Callable

import torch

VOCAB = 331  # odd, and larger than the tokenizer's (as Qwen's padded vocabularies are)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # Llama 3's names, not GPT-2's


def stdlib_bpe(special_tokens: list[str]):
    """A 300-token byte-level BPE (`tokenizers.Tokenizer`) trained on a few stdlib files,
    with `special_tokens`: the base of the tests' HF and chat tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    src = Path(sysconfig.get_paths()["stdlib"])
    text = [p.read_text(errors="replace") for p in sorted(src.glob("a*.py"))[:6]]
    tk.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def hf_tokenizer(d: Path):
    """A byte-level BPE with Llama 3's special-token names, saved as transformers does."""
    # transformers is optional: the modules using this skip without it (importorskip)
    import transformers

    tk = stdlib_bpe([BOS, EOS])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS,
                                                eos_token=EOS)
    fast.save_pretrained(d)
    return fast


def hf_model_dir(d: Path, arch: str, config: dict, shard: str,
                 init: Callable[[torch.nn.Module], None] | None = None):
    """transformers' `<arch>ForCausalLM` of `<arch>Config(**config)`, seeded with 0 and in
    eval mode, `init(model)` applied (weights a test needs away from their defaults),
    saved into `d` in files of at most `shard` with `hf_tokenizer`; returns the model.
    Its bos / eos ids (config.json, generation_config.json) are the tokenizer's, as
    transformers reads them: a swap of BOS and EOS above reaches every file."""
    import transformers  # optional, as in hf_tokenizer

    fast = hf_tokenizer(d)
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(
        **config, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    if init is not None:
        init(model)
    model.save_pretrained(d, max_shard_size=shard)
    return model
