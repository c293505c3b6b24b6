"""Cleaning, counts and the train/val/test split by content hash (the pipeline's steps
in `dt_steps.py` call these).

Each step is a pure function of the file bytes, so the result does not depend on the
machine, the number of workers or the order files are listed in beyond their sorted path.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from enum import Enum

from scaletrain.errors import ConfigError

SPLITS = ("train", "val", "test")


@dataclass
class Counts:
    """What happened to the input files; goes into manifest.json as is."""

    files: int = 0
    skipped_binary: int = 0
    skipped_undecodable: int = 0
    too_short: int = 0
    duplicates: int = 0
    documents: int = 0


@dataclass
class Document:
    """A cleaned document; `h` is the sha256 of its UTF-8 text (dedup and split key)."""

    text: str
    h: bytes = field(repr=False)


class Skip(Enum):
    """Why a file or record yields no document before any text-level filter."""

    BINARY = "binary"
    UNDECODABLE = "undecodable"
    MALFORMED = "malformed"  # a record that is not JSON or has no string text field


def clean_text(raw: bytes) -> str | Skip:
    """Decode and normalise one file's bytes into its text, or say why it is skipped.

    Binary means a NUL byte (as `git` and `grep` decide it); text files never hold one.
    Newlines become '\\n', Unicode becomes NFC (so that the same text typed two ways is
    one document and one token sequence), trailing whitespace goes, and a document ends
    with exactly one '\\n' so that every one is followed by "\\n<|endoftext|>" alike.
    """
    text = decode_text(raw)
    return text if isinstance(text, Skip) else normalize_text(text)


def decode_text(raw: bytes) -> str | Skip:
    """A text file's bytes as str, or why it is not text (binary: a NUL byte, as `git`
    and `grep` decide it; undecodable: not UTF-8)."""
    if b"\0" in raw:
        return Skip.BINARY
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return Skip.UNDECODABLE


def normalize_text(text: str) -> str:
    """The cleaned form of a document's text (see `clean_text`); "" when nothing is left."""
    text = text.removeprefix("\ufeff")  # a byte-order mark carries no content
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text).rstrip()
    return text + "\n" if text else ""


def hash_uniform(h: bytes) -> float:
    """The first 8 bytes of a sha256 digest as a number uniform in [0, 1)."""
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_documents(docs: list[Document], val_fraction: float,
                    test_fraction: float) -> dict[str, list[Document]]:
    """Assign each document to a split by its hash, keeping the input order within a split.

    u = hash_uniform(h): u < val -> val, u < val + test -> test, else train. Hashing, not a
    shuffle, means adding a file never moves the *other* documents between splits. With a
    small corpus a split can come out empty by chance; then (if there are >= 3 documents)
    the document with the smallest hash of the largest split is moved there, so a split
    whose fraction is > 0 always has at least one document.
    """
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        u = hash_uniform(d.h)
        s = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction \
            else "train"
        out[s].append(d)
    wanted = {"train": True, "val": val_fraction > 0, "test": test_fraction > 0}
    for s in SPLITS:
        if wanted[s] and not out[s]:
            donor = max(SPLITS, key=lambda k: (len(out[k]), k == "train"))
            if len(out[donor]) < 2:
                break  # too few documents; the caller reports it
            moved = min(out[donor], key=lambda d: d.h)
            out[donor].remove(moved)
            out[s].append(moved)
    return out


def documents_needed(val_fraction: float, test_fraction: float) -> int:
    """The fewest documents that give every wanted split at least one."""
    return 1 + (val_fraction > 0) + (test_fraction > 0)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ConfigError if val + test leave no data for training."""
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"data.val_fraction + data.test_fraction = "
                          f"{val_fraction + test_fraction:g} must be < 1 (nothing is left "
                          f"for the train split)")
