"""Prepare a data source once into a cached directory the loaders memory-map.

Text pipeline (datatrove, `pipeline.py`): list files -> read records (text files, JSONL,
Parquet, saved datasets), clean -> drop short -> exact dedup -> split by content hash ->
train byte-level BPE on a sample of train -> tokenize (worker processes) -> flat token
files + tokenizer.json + manifest.json. Image pipeline: see `vision.py`. Both are cached
under a key of their inputs and settings (`cache.py`), so calling `prepare` again is a few
`stat` calls, and changing an input file or a setting gives a fresh directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import tokenizers

from scaletrain.config.paths import check_dir_field
from scaletrain.config.schema import DataConfig
from scaletrain.data.cache import build_cached, cache_key, valid_manifest
from scaletrain.data.chat_prepare import prepare_chat
from scaletrain.data.clean import check_fractions
from scaletrain.data.filters import check_filters
from scaletrain.data.pipeline import build_text
from scaletrain.data.report import REPORT, draw_report
from scaletrain.data.shards import token_dtype
from scaletrain.data.sources import InputFiles, list_text_files, slug
from scaletrain.data.vision import DIGITS, prepare_digits
from scaletrain.errors import DataError

__all__ = ["cached_text_dir", "prepare", "prepare_text", "prepare_digits", "text_settings", "MIN_TRAIN_TOKENS"]

DEFAULT_SAMPLE_BYTES = DataConfig().tokenizer_sample_bytes

MIN_TRAIN_TOKENS = 2
"""The train split must give at least one (input, target) pair; the seq_len-specific
check ("fewer than seq_len+1 tokens") is made where seq_len is known, in `datasets.py`."""


def prepare(dcfg: DataConfig, *, progress: bool) -> Path:
    """Prepare `dcfg.source` ('digits', 'python-stdlib', a directory or a glob) if needed.

    Returns the prepared directory (it holds manifest.json).
    """
    check_dir_field("data.prepared_dir", dcfg.prepared_dir)  # a file there: one line
    if dcfg.source == DIGITS:
        return prepare_digits(dcfg, progress=progress)
    if dcfg.format == "chat":  # conversations rendered with a chat template
        return prepare_chat(dcfg, progress=progress)
    return prepare_text(dcfg, progress=progress)


def text_settings(dcfg: DataConfig) -> dict:
    """The settings that change a prepared text dataset, i.e. that go into its key.

    Not `prep_workers` (the output does not depend on it) nor the loader settings. The
    `tokenizers` version is in because BPE training may change between its releases.
    """
    return {
        "kind": "text",
        "vocab_size": dcfg.vocab_size,
        "val_fraction": dcfg.val_fraction,
        "test_fraction": dcfg.test_fraction,
        "min_chars": dcfg.min_chars,
        "max_files": dcfg.max_files,
        "tokenizers": tokenizers.__version__,
    } | _tokenizer_setting(dcfg) | _new_settings(dcfg)


def _new_settings(dcfg: DataConfig) -> dict:
    """Settings added with the datatrove pipeline, in the key only when not their
    default, so that caches prepared before they existed stay valid (same output)."""
    out = {}
    if dcfg.text_key != "text":
        out["text_key"] = dcfg.text_key
    if dcfg.tokenizer_sample_bytes != DEFAULT_SAMPLE_BYTES:
        out["tokenizer_sample_bytes"] = dcfg.tokenizer_sample_bytes
    if dcfg.filters:
        out["filters"] = list(dcfg.filters)
        out["filter_args"] = dcfg.filter_args
        out["datatrove"] = version("datatrove")  # its filters' rules may change
    if dcfg.dedup != "exact":
        out["dedup"] = dcfg.dedup
        out["minhash"] = [dcfg.minhash_ngrams, dcfg.minhash_buckets,
                          dcfg.minhash_hashes_per_bucket]
        out["datatrove"] = version("datatrove")
    return out


def _tokenizer_setting(dcfg: DataConfig) -> dict:
    """A given tokenizer (data.tokenizer) keys the cache by its content; absent, the key
    is unchanged from before the option existed (existing caches stay valid)."""
    if not dcfg.tokenizer:
        return {}
    p = Path(dcfg.tokenizer)
    if not p.is_file():
        raise DataError(f"data.tokenizer: '{p}' is not a file")
    return {"tokenizer_sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def prepare_text(dcfg: DataConfig, *, progress: bool) -> Path:
    """Prepare a text source into `<prepared_dir>/<slug>-<key[:12]>/` unless cached.

    The directory holds `train.bin`, `val.bin`, `test.bin` (flat token ids, see
    `shards.py`), `tokenizer.json` and `manifest.json`. Raises DataError, with the source
    in the message, when there is nothing usable to prepare.
    """
    inputs, settings, final, key = _text_target(dcfg)
    check_filters(dcfg.filters, dcfg.filter_args)  # before anything is written
    # The work directory is named by the key, not by this process: a prepare killed
    # midway and started again finds datatrove's completed tasks there and resumes.
    work = final.parent / f".work-{final.name}"
    final.parent.mkdir(parents=True, exist_ok=True)
    # Two preparations of one key must not share its work directory at once: the
    # second waits on a lock of the prepared_dir itself (no lock file is left behind),
    # then finds the first one's published directory (a cache hit).
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Under the lock no other preparation of this key runs: a temporary directory of
        # it is what a killed `prepare` left behind (its work directory is resumed).
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return build_cached(final, key, lambda tmp: _build_text(
            tmp, work, inputs, dcfg, settings, progress))
    except DataError:
        shutil.rmtree(work, ignore_errors=True)  # bad input: nothing to resume
        raise
    finally:
        os.close(fd)  # releases the lock


def cached_text_dir(dcfg: DataConfig) -> Path | None:
    """The prepared directory of a text source if it is already cached, else None (a
    look-up only: nothing is read beyond the file listing, nothing is written). For a
    data.mixture: its sources prepared together, whose tokenizer the mixture trains
    (data/mixture_prepare.py)."""
    if dcfg.mixture:
        dcfg = replace(dcfg, source=[e["source"] for e in dcfg.mixture], mixture=[])
    _, _, final, key = _text_target(dcfg)
    return final if valid_manifest(final, key) is not None else None


def _text_target(dcfg: DataConfig):
    """(input files per source, settings, prepared directory, cache key) of a text
    source or a list of them (one corpus; a one-item list is that source's cache)."""
    check_fractions(dcfg.val_fraction, dcfg.test_fraction)
    sources = source_list(dcfg.source)
    # data.max_files applies to each source of a list.
    inputs = [list_text_files(s, dcfg.max_files, exclude=Path(dcfg.prepared_dir))
              for s in sources]
    settings = text_settings(dcfg)
    # The root is in the key so that two copies of a corpus with equal names, sizes and
    # times (cp -p) in different places are still told apart. One source keeps the key
    # it had before lists existed (its caches stay valid).
    fp = [{"root": str(i.root), "files": i.fingerprint()} for i in inputs]
    key = cache_key(fp[0] if len(fp) == 1 else {"sources": fp}, settings)
    name = slug(sources[0]) + (f"+{len(sources) - 1}" if len(sources) > 1 else "")
    return inputs, settings, Path(dcfg.prepared_dir) / f"{name}-{key[:12]}", key


def source_list(source: str | list[str]) -> list[str]:
    """data.source as a list of sources (a string is one)."""
    return [source] if isinstance(source, str) else list(source)


def _build_text(out: Path, work: Path, inputs: list[InputFiles], dcfg: DataConfig,
                settings: dict, progress: bool) -> dict:
    """Write the prepared text files and report.png into `out`; returns the manifest."""
    src = dcfg.source if isinstance(dcfg.source, str) or len(dcfg.source) > 1 \
        else dcfg.source[0]
    built = build_text(out, inputs, dcfg, progress, work=work)
    tok, stats = built.tokenizer, built.splits
    if stats["train"]["tokens"] < MIN_TRAIN_TOKENS:
        raise DataError(f"{src}: the train split has {stats['train']['tokens']} tokens, "
                        f"fewer than {MIN_TRAIN_TOKENS}")
    manifest = {
        "kind": "text",
        "source": src,
        "root": str(inputs[0].root) if len(inputs) == 1 else [str(i.root) for i in inputs],
        "settings": settings,
        "counts": asdict(built.counts),
        # manifest.json is written with sorted keys: the pipeline's order, for the table
        # and report.png, is kept here.
        "stage_order": list(built.stages),
        "stages": built.stages,
        "sources": built.sources,
        "splits": stats,
        "dtype": token_dtype(tok.vocab_size).name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "tokenizer": "tokenizer.json",
        "lengths": built.lengths,
    }
    draw_report(out / REPORT, manifest)
    return manifest
