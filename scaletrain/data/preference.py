"""Preference data for DPO (train.objective = "dpo"): JSONL records of `prompt`,
`chosen` and `rejected` strings, prepared once into a cached directory, and the dataset
the loader draws (chosen, rejected) pairs from.

Preparation: read every record (preference_records.py: a one-line error for a line that
is not a JSON object or lacks a field; a record without `prompt` has TRL's implicit
prompt, the shared beginning of `chosen` and `rejected`), split by content hash (the records with the lowest sha256 go to
val, then test: the split does not depend on the file order), tokenize each field apart
with the run's tokenizer (data.tokenizer / init.from's, else a BPE trained on the train
split's texts), and store the ids untruncated: `<split>-ids.npy` (every record's prompt,
chosen, rejected ids back to back) and `<split>-lengths.npy` (N, 3). Fields are tokenized
separately and concatenated (prompt ids + response ids), as TRL's DPOTrainer does, so the
prompt / response boundary is exact; each response ends with the end-of-text id, so the
model is also taught to stop.

Chat-shaped records (data.format = "chat", TRL's conversational preference format):
`prompt` is a list of {role, content} messages, `chosen` and `rejected` lists of the
assistant message(s) that answer it. Each of prompt + chosen and prompt + rejected is
rendered with the model's chat template by data/chat.py `render` (so its ids are
`tokenizer.apply_chat_template(prompt + chosen)`), and the response is the chosen /
rejected assistant tokens (their content and end-of-turn token; assistant turns inside
the prompt are context, not trained). Stored in the same layout: the prompt is the ids
both renderings share before the first response token, the responses the rest of each
rendering (the template's end of turn is in it: no end-of-text is added), plus
`<split>-mask.npy`, one uint8 per stored id: 1 = a response token the log-probability
covers (0 for the separator a template writes after its end-of-turn token).

Truncation happens when the dataset is opened, where model.seq_len is known (the cache
does not depend on it): the prompt is kept whole and the response cut to fit seq_len + 1
tokens (inputs are the first seq_len, targets the last seq_len, as in TokenWindows); a
prompt that leaves no room for one response token is a DataError naming the record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import tokenizers
import torch

from scaletrain.config.schema import DataConfig
from scaletrain.data import tokenizer as tokenizer_mod
from scaletrain.data.chat import load_chat_tokenizer, render, tokenizer_fingerprint
from scaletrain.data.cache import build_cached, cache_key
from scaletrain.data.clean import SPLITS, check_fractions
from scaletrain.data.preference_records import Record, read_records
from scaletrain.data.sources import list_text_files, slug
from scaletrain.errors import DataError
from scaletrain.models.losses import IGNORE_INDEX

MASK = "-mask.npy"  # chat records: <split>-mask.npy beside <split>-ids.npy


def preference_keys(dpo_cfg) -> tuple[str, str, str]:
    """The (prompt, chosen, rejected) field names of the `[dpo]` section."""
    return dpo_cfg.prompt_key, dpo_cfg.chosen_key, dpo_cfg.rejected_key


def split_records(records: list[Record], val_fraction: float,
                  test_fraction: float) -> dict[str, list[Record]]:
    """Records per split: ordered by the sha256 of their JSON, the first
    round(n * val_fraction) (at least one when the fraction is > 0) go to val, the next
    to test, the rest to train in file order."""
    digests = [hashlib.sha256(json.dumps(r).encode()).hexdigest() for r in records]
    order = sorted(range(len(records)), key=lambda i: digests[i])
    n = len(records)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= n:
        raise DataError(f"{n} preference record(s) leave none to train on after the val "
                        f"({n_val}) and test ({n_test}) splits (data.val_fraction, "
                        f"data.test_fraction)")
    which = {i: "val" for i in order[:n_val]} | {i: "test" for i in order[n_val:n_val + n_test]}
    return {s: [r for i, r in enumerate(records) if which.get(i, "train") == s]
            for s in SPLITS}


def prepare_preference(dcfg: DataConfig, keys: tuple[str, str, str], *,
                       progress: bool) -> Path:
    """Prepare the preference records of `dcfg.source` unless cached; the directory."""
    check_fractions(dcfg.val_fraction, dcfg.test_fraction)
    inputs = list_text_files(dcfg.source, dcfg.max_files, exclude=Path(dcfg.prepared_dir))
    chat = dcfg.format == "chat"
    settings = {"kind": "preference", "keys": list(keys), "vocab_size": dcfg.vocab_size,
                "val_fraction": dcfg.val_fraction, "test_fraction": dcfg.test_fraction,
                "tokenizers": tokenizers.__version__}
    renderer = None
    if chat:  # ConfigError without a template, before any record is read
        renderer = load_chat_tokenizer(dcfg.tokenizer, dcfg.chat_template)
        settings |= {"format": "chat"} | tokenizer_fingerprint(renderer)
    if dcfg.tokenizer:
        p = Path(dcfg.tokenizer)
        if not p.is_file():
            raise DataError(f"data.tokenizer: '{p}' is not a file")
        settings["tokenizer_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    key = cache_key({"root": str(inputs.root), "files": inputs.fingerprint()}, settings)
    final = Path(dcfg.prepared_dir) / f"{slug(dcfg.source)}-pref-{key[:12]}"

    def build(out: Path) -> dict:
        splits = split_records(read_records(inputs.files, keys, chat), dcfg.val_fraction,
                               dcfg.test_fraction)
        if dcfg.tokenizer:  # fine-tuning: the source model's ids
            tok = tokenizer_mod.Tokenizer.load(dcfg.tokenizer)
        else:
            texts = (t for r in splits["train"] for t in r)
            tok = tokenizer_mod.train_bpe(texts, dcfg.vocab_size, progress=progress)
        tok.save(out / "tokenizer.json")
        counts = {}
        for split, recs in splits.items():
            if chat:
                ids, lengths, mask = _render(renderer, recs, split)
                np.save(out / f"{split}{MASK}", mask)
            else:
                ids, lengths = _tokenize(tok, recs)
            np.save(out / f"{split}-ids.npy", ids)
            np.save(out / f"{split}-lengths.npy", lengths)
            counts[split] = {"pairs": len(recs), "tokens": int(ids.size)}
        return {"kind": "preference", "source": dcfg.source, "settings": settings,
                "splits": counts, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                "tokenizer": "tokenizer.json"}

    return build_cached(final, key, build)


def _tokenize(tok, records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 ids, (N, 3) int64 lengths): prompt, chosen + eot, rejected + eot."""
    flat = [t for r in records for t in r]
    enc = tok.encode_batch(flat) if flat else []
    seqs = []
    for i in range(0, len(enc), 3):
        seqs += [enc[i], enc[i + 1] + [tok.eot_id], enc[i + 2] + [tok.eot_id]]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64).reshape(-1, 3)
    ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    return ids, lengths


def render_pair(renderer, record: Record, where: str):
    """(prompt ids, chosen ids, rejected ids, chosen mask, rejected mask) of a chat
    record: prompt + chosen and prompt + rejected rendered by data/chat.py `render`, the
    prompt being the ids both share before either's first response token."""
    prompt, chosen, rejected = record
    # The prompt's own assistant turns (a multi-turn prompt) are context: unmasked. They
    # render at the same ids in the whole conversation (render checks that the template
    # renders a prefix as a prefix), each ending at its end-of-turn token.
    context = render(renderer, prompt, "assistant", where).mask \
        if any(m["role"] == "assistant" for m in prompt) else []
    seqs = []
    for response in (chosen, rejected):
        r = render(renderer, prompt + response, "assistant", where)
        mask = [0 if j < len(context) and context[j] else m for j, m in enumerate(r.mask)]
        if 1 not in mask:
            raise DataError(f"{where}: the chat template renders no assistant token of "
                            f"the response")
        seqs.append((r.ids, mask))
    (c_ids, c_mask), (r_ids, r_mask) = seqs
    p = min(c_mask.index(1), r_mask.index(1))
    if c_ids[:p] != r_ids[:p]:
        raise DataError(f"{where}: the chosen and rejected conversations render different "
                        f"prompt tokens")
    return c_ids[:p], c_ids[p:], r_ids[p:], c_mask[p:], r_mask[p:]


def _render(renderer, records: list[Record], split: str):
    """(flat int64 ids, (N, 3) int64 lengths, flat uint8 mask) of chat records."""
    ids, lengths, mask = [], [], []
    for i, rec in enumerate(records):
        p, c, r, cm, rm = render_pair(renderer, rec, f"{split} record {i}")
        ids += p + c + r
        mask += [0] * len(p) + cm + rm
        lengths.append((len(p), len(c), len(r)))
    return (np.array(ids, dtype=np.int64), np.array(lengths, dtype=np.int64).reshape(-1, 3),
            np.array(mask, dtype=np.uint8))


class PreferencePairs:
    """The pairs of one prepared split, as (inputs, targets) batches of shape (B, 2, T):
    [:, 0] the chosen sequence, [:, 1] the rejected one. inputs = sequence[:-1] and
    targets = sequence[1:], right-padded with the end-of-text id; targets are
    IGNORE_INDEX except at response tokens (chat records: those their mask file marks),
    so `targets != IGNORE_INDEX` is the response mask and the batch keeps the loader's
    (inputs, targets) shape."""

    def __init__(self, path: Path, split: str, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = int(seq_len), int(pad_id)
        ids = np.load(path / f"{split}-ids.npy")
        lengths = np.load(path / f"{split}-lengths.npy")
        starts = np.concatenate([[0], np.cumsum(lengths.reshape(-1))[:-1]]).reshape(-1, 3)
        self.ids, self.lengths, self.starts = ids, lengths, starts
        mask_file = path / f"{split}{MASK}"
        self.mask = np.load(mask_file) if mask_file.is_file() else None
        too_long = np.nonzero(lengths[:, 0] >= self.seq_len + 1)[0]
        if too_long.size:
            i = int(too_long[0])
            raise DataError(f"{split} pair {i} of {path}: its prompt is {lengths[i, 0]} "
                            f"tokens, leaving no room for a response within model.seq_len="
                            f"{self.seq_len}")
        empty = np.nonzero(lengths[:, 0] == 0)[0]
        if empty.size:  # the first response token would have nothing to be predicted from
            raise DataError(f"{split} pair {int(empty[0])} of {path}: its prompt is empty")
        if self.mask is not None:  # a response's first trained token must fit the window
            for i in range(len(lengths)):
                for w in (1, 2):
                    s, n = int(starts[i, w]), int(lengths[i, w])
                    first = int(np.argmax(self.mask[s:s + n]))
                    if lengths[i, 0] + first >= self.seq_len + 1:
                        raise DataError(f"{split} pair {i} of {path}: its prompt and the "
                                        f"response's header are {lengths[i, 0] + first} "
                                        f"tokens, leaving no room for a response within "
                                        f"model.seq_len={self.seq_len}")

    def __len__(self) -> int:
        return len(self.lengths)

    def _row(self, i: int, which: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (T,), targets (T,)) of pair i's chosen (1) or rejected (2) sequence."""
        T = self.seq_len
        p = int(self.lengths[i, 0])
        r = min(int(self.lengths[i, which]), T + 1 - p)  # the prompt kept, response cut
        s0, sr = self.starts[i, 0], self.starts[i, which]
        seq = np.concatenate([self.ids[s0:s0 + p], self.ids[sr:sr + r]])
        x = np.full(T, self.pad_id, dtype=np.int64)
        y = np.full(T, IGNORE_INDEX, dtype=np.int64)
        x[:len(seq) - 1] = seq[:-1]
        # Target j predicts seq[j + 1]: the response tokens seq[p:] are targets p-1 ...
        y[p - 1:len(seq) - 1] = seq[p:]
        if self.mask is not None:  # chat: only the assistant tokens of the response
            keep = self.mask[sr:sr + r].astype(bool)
            y[p - 1:len(seq) - 1][~keep] = IGNORE_INDEX
        return x, y

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 (B, 2, T), of the pairs `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = [self._row(int(i), w) for i in idx for w in (1, 2)]
        T = self.seq_len
        x = np.stack([r[0] for r in rows]) if rows else np.zeros((0, T), np.int64)
        y = np.stack([r[1] for r in rows]) if rows else np.zeros((0, T), np.int64)
        return (torch.from_numpy(x.reshape(-1, 2, T)), torch.from_numpy(y.reshape(-1, 2, T)))
