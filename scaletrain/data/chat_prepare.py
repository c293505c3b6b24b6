"""Prepare chat data (data.format='chat') into a cached directory: per split, the token
stream of its conversations and a parallel loss-mask file.

Layout (beside manifest.json and tokenizer.json), per split:
- `<split>.bin`: every conversation's ids (chat.py `render`) followed by the end-of-text
  id, in the flat little-endian layout of shards.py, so document masking
  (models/documents.py) cuts packed windows at the same token as for text;
- `<split>.mask.bin`: uint8, one per token: 1 = the token is a target the loss covers
  (the separator never is);
- `<split>.docs.bin`: int64 offsets of every conversation's first token, then the
  stream length: how chat_windows.py packs whole conversations into windows of any
  seq_len (the files do not depend on it).

Records are read in the sorted file order; exact duplicate conversations are dropped and
the split is by content hash, as for text (clean.py `split_documents`). Rendering runs
in this process: it is transformers' Jinja plus one tokenizer call per assistant turn,
far cheaper than the training it feeds, so the datatrove text pipeline's worker fan-out
is not used here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from scaletrain.config.schema import DataConfig
from scaletrain.data.cache import build_cached, cache_key
from scaletrain.data.chat import Rendered, check_messages, load_chat_tokenizer, render
from scaletrain.data.chat import tokenizer_fingerprint
from scaletrain.data.clean import SPLITS, Document, check_fractions, documents_needed
from scaletrain.data.clean import split_documents
from scaletrain.data.records import _open_lines
from scaletrain.data.shards import DOCS_SUFFIX, MASK_SUFFIX, token_dtype
from scaletrain.data.sources import JSONL, InputFiles, file_format, list_text_files, slug
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.errors import DataError


def prepare_chat(dcfg: DataConfig, *, progress: bool) -> Path:
    """Prepare the chat source `dcfg.source` into `<prepared_dir>/<slug>-<key[:12]>/`
    unless cached; returns the directory. ConfigError without a chat template, DataError
    (naming file and line) for a record the template cannot render."""
    check_fractions(dcfg.val_fraction, dcfg.test_fraction)
    tok = load_chat_tokenizer(dcfg.tokenizer, dcfg.chat_template)
    inputs = list_text_files(dcfg.source, dcfg.max_files, exclude=Path(dcfg.prepared_dir))
    for p in inputs.files:
        if file_format(p) != JSONL:
            raise DataError(f"{p}: data.format='chat' reads JSONL files (.jsonl, "
                            ".jsonl.gz, .jsonl.zst) of '{dcfg.messages_key}' records")
    settings = {"kind": "chat", "messages_key": dcfg.messages_key, "train_on": dcfg.train_on,
                "val_fraction": dcfg.val_fraction, "test_fraction": dcfg.test_fraction,
                "max_files": dcfg.max_files} | tokenizer_fingerprint(tok)
    key = cache_key({"root": str(inputs.root), "files": inputs.fingerprint()}, settings)
    final = Path(dcfg.prepared_dir) / f"{slug(dcfg.source)}-{key[:12]}"
    return build_cached(final, key, lambda tmp: _build(tmp, inputs, dcfg, tok, settings))


def _read(inputs: InputFiles, dcfg: DataConfig, tok) -> tuple[list, int]:
    """(Document, Rendered) per distinct conversation in file order; duplicates dropped."""
    seen: set[bytes] = set()
    out, dups = [], 0
    for path in inputs.files:
        with _open_lines(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise DataError(f"{where}: not a JSON record") from None
                msgs = check_messages(rec, dcfg.messages_key, where)
                h = hashlib.sha256(json.dumps(msgs, sort_keys=True).encode("utf-8")).digest()
                if h in seen:
                    dups += 1
                    continue
                seen.add(h)
                out.append((Document("", h), render(tok, msgs, dcfg.train_on, where)))
    return out, dups


def _build(out: Path, inputs: InputFiles, dcfg: DataConfig, tok, settings: dict) -> dict:
    convs, dups = _read(inputs, dcfg, tok)
    need = documents_needed(dcfg.val_fraction, dcfg.test_fraction)
    if len(convs) < need:
        raise DataError(f"{dcfg.source}: {len(convs)} distinct conversation(s); need at "
                        f"least {need} for the train/val/test splits")
    st = Tokenizer.load(dcfg.tokenizer)  # the run's tokenizer: its end-of-text id
    st.save(out / "tokenizer.json")
    rendered = {id(d): r for d, r in convs}
    parts = split_documents([d for d, _ in convs], dcfg.val_fraction, dcfg.test_fraction)
    dtype = token_dtype(st.vocab_size)
    splits = {s: _write(out, s, [rendered[id(d)] for d in parts[s]], st.eot_id, dtype)
              for s in SPLITS}
    if splits["train"]["targets"] == 0:
        raise DataError(f"{dcfg.source}: the train split has no target tokens "
                        f"(data.train_on='{dcfg.train_on}': no assistant messages?)")
    stages = {"records": len(convs) + dups, "duplicates": dups, "conversations": len(convs)}
    return {"kind": "text", "format": "chat", "source": dcfg.source,
            "root": str(inputs.root), "settings": settings, "stages": stages,
            "splits": splits, "dtype": dtype.name, "vocab_size": st.vocab_size,
            "eot_id": st.eot_id, "tokenizer": "tokenizer.json"}


def _write(out: Path, split: str, convs: list[Rendered], eot: int, dtype) -> dict:
    """Write one split's three files; its manifest entry. `eot_inside`: some
    conversation holds the end-of-text id itself (a template whose end of turn is the
    tokenizer's eos, as Llama 2's </s>), so documents cannot be cut at it."""
    ids = [i for c in convs for i in (*c.ids, eot)]
    mask = [m for c in convs for m in (*c.mask, 0)]
    starts = np.cumsum([0] + [len(c.ids) + 1 for c in convs], dtype=np.int64)
    np.asarray(ids, dtype=dtype.newbyteorder("<")).tofile(out / f"{split}.bin")
    np.asarray(mask, dtype=np.uint8).tofile(out / f"{split}{MASK_SUFFIX}")
    starts.astype("<i8").tofile(out / f"{split}{DOCS_SUFFIX}")
    return {"documents": len(convs), "tokens": len(ids), "targets": int(sum(mask)),
            "eot_inside": any(eot in c.ids for c in convs), "file": f"{split}.bin"}
