"""Byte-level BPE tokenizer: training on the train split and an exact encode/decode wrapper.

Built on the Hugging Face `tokenizers` library (DESIGN.md §1.11) rather than by hand. The
configuration follows GPT-2: a ByteLevel pre-tokenizer maps every byte to a printable
character before the GPT-2 regex split, so any UTF-8 text is representable without an
unknown token, and the ByteLevel decoder maps them back. There is deliberately no
normalizer and no prefix space: Unicode normalisation happens once, in `clean.py`, so
that `decode(encode(s)) == s` holds for *every* string, including non-NFC ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from scaletrain.errors import DataError

EOT = "<|endoftext|>"
"""The one special token, appended after every document (as in GPT-2)."""
# The end-of-text (document separator) token of a tokenizer that came from a Hugging
# Face model directory (init.from), first one present: GPT-2 / Qwen / SmolLM's, Llama 3's
# base-model one, Mistral / Llama 2's. Read from tokenizer.json alone, so the choice
# survives every copy (run directory, worker processes) without a side file. A chat
# model's turn-end token (<|im_end|>, <|eot_id|>) is not a document boundary.
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>")
# The beginning-of-text token, first one present: Llama 3's, Mistral / Llama 2's. Only
# written into an HF export (config.json bos_token_id, tokenizer_config.json), so
# transformers sees the ids the source directory declared; scaletrain never adds it.
BOT_NAMES = ("<|begin_of_text|>", "<s>")
# Beside a tokenizer.json from a Hugging Face directory: its declared special tokens.
TOKENIZER_CONFIG = "tokenizer_config.json"


class SpecialTokensError(DataError):
    """A Hugging Face directory's tokenizer_config.json is unreadable or its declared
    special tokens contradict the end-of-text token scaletrain picked (`check_declared`):
    the user's to fix, never a reason to load the directory without its tokenizer."""


class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer` with the end-of-text id at hand."""

    def __init__(self, hf: HFTokenizer):
        found = [name for name in EOT_NAMES if hf.token_to_id(name) is not None]
        if not found:
            raise ValueError(f"tokenizer has no end-of-text token (one of "
                             f"{', '.join(EOT_NAMES)})")
        eot = hf.token_to_id(found[0])
        # A document that literally contains "<|endoftext|>" (this very file does) must
        # be encoded as ordinary text, not as a document boundary; so must a prompt
        # (serve, generate), and the HF export says the same to transformers
        # (`split_special_tokens`, checkpoint/export.py). The flag is not part of
        # tokenizer.json, so it is set here, on every construction.
        hf.encode_special_tokens = True
        self._hf = hf
        self.eot_id: int = eot
        self.eot_token: str = found[0]
        bot = [name for name in BOT_NAMES if hf.token_to_id(name) is not None]
        self.bos_token: str | None = bot[0] if bot else None
        self.bos_id: int | None = hf.token_to_id(bot[0]) if bot else None
        self.vocab_size: int = hf.get_vocab_size()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a `tokenizer.json` written by :meth:`save` (or by `prepare`)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: not a valid tokenizer file ({first})") from None
        try:
            tok = cls(hf)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        check_declared(path, tok)
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a single `tokenizer.json` file."""
        self._hf.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the end-of-text id."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; uses the library's (Rust, multi-threaded) batching."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the end-of-text id decodes to its literal token string."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_str(self) -> str:
        """The JSON form, small enough to send to worker processes."""
        return self._hf.to_str()

    @classmethod
    def from_str(cls, s: str) -> Tokenizer:
        """Inverse of :meth:`to_str`."""
        return cls(HFTokenizer.from_str(s))


def _declared(config: dict, key: str) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken's dict."""
    v = config.get(key)
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def check_declared(path: Path, tok: Tokenizer) -> None:
    """SpecialTokensError when the tokenizer_config.json beside `path` (a Hugging Face directory)
    names special tokens that contradict the ones scaletrain picked by name: an eos that
    is another end- or beginning-of-text token, or our end-of-text declared as its bos.
    Documents would then be separated, and generation stopped, at an id transformers
    reads as something else. A chat model's turn end declared as eos (<|im_end|>,
    <|eot_id|>) is fine: it is not a document boundary (EOT_NAMES)."""
    f = path.parent / TOKENIZER_CONFIG
    if not f.is_file():
        return
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecialTokensError(f"{f}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise SpecialTokensError(f"{f}: not a tokenizer config (a JSON object)")
    eos, bos = _declared(config, "eos_token"), _declared(config, "bos_token")
    ours = f"{tok.eot_token!r} (id {tok.eot_id})"
    if eos in EOT_NAMES + BOT_NAMES and eos != tok.eot_token:
        raise SpecialTokensError(f"{f}: eos_token is {eos!r}, but scaletrain ends documents "
                                 f"(and generation) with {path.name}'s {ours}; fix the "
                                 "directory's special tokens")
    if bos == tok.eot_token and eos != tok.eot_token:
        raise SpecialTokensError(f"{f}: bos_token is {bos!r}, the token scaletrain ends "
                                 "documents (and generation) with; fix the directory's "
                                 "special tokens")


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: int | None = None,
              progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer of (at most) `vocab_size` tokens on `texts`.

    The vocabulary may come out smaller than asked when the corpus has too few distinct
    pairs to merge; callers must read `Tokenizer.vocab_size` rather than assume it.
    """
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # gets id 0: special tokens are added first
        # All 256 byte symbols, even ones the train split lacks, so that val/test/user
        # text with unseen bytes still encodes (no unknown token exists).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    hf.train_from_iterator(texts, trainer, length=length)
    return Tokenizer(hf)
