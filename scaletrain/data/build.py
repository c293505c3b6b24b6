"""`build_data(cfg)`: the one entry point the trainer needs — prepare `cfg.data` (cached)
and open its splits as datasets.

Not in `scaletrain/data/__init__.py`: this module imports torch (through the datasets),
and the package's `__init__` runs in every datatrove worker process of `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaletrain.data.cache import read_manifest
from scaletrain.data.chat_windows import ChatWindows
from scaletrain.data.datasets import ArrayDataset, MixtureWindows, TokenWindows
from scaletrain.data.mixture_prepare import prepare_mixture
from scaletrain.data.preference import PreferencePairs, prepare_preference, preference_keys
from scaletrain.data.prepare import prepare as prepare_data  # not `prepare`: the submodule's name
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.data.vision import load_digits_arrays
from scaletrain.errors import DataError

if TYPE_CHECKING:
    from scaletrain.config.schema import Config

__all__ = ["Data", "build_data"]


def check_chat_masking(dcfg, manifest: dict) -> None:
    """DataError when document masking would cut conversations apart: the template
    writes the end-of-text id inside them (chat_prepare.py `eot_inside`)."""
    if dcfg.document_masking and any(s.get("eot_inside") for s in manifest["splits"].values()):
        raise DataError("data.document_masking: the chat template writes the end-of-text "
                        "token inside conversations, so they cannot be cut at it; use "
                        "data.chat_packing='pad' with data.document_masking=false")


@dataclass
class Data:
    """A prepared dataset, ready for loaders.

    `train`/`val`/`test` are `TokenWindows` (text) or `ArrayDataset` (image); `val` or
    `test` is None when its fraction is 0. Text sets `tokenizer` and `vocab_size`; images
    set `num_classes` and `input_shape` (C, H, W).
    """

    kind: str
    path: Path
    train: Any
    val: Any
    test: Any
    tokenizer: Tokenizer | None = None
    vocab_size: int | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    manifest: dict = field(default_factory=dict, repr=False)


def build_data(cfg: Config, *, progress: bool) -> Data:
    """Prepare `cfg.data` (a no-op when cached) and open its splits.

    Text windows are `cfg.model.seq_len` tokens long; a split too short for one window
    raises DataError naming it. A `data.mixture` gives `MixtureWindows` splits.
    """
    if cfg.train.objective == "dpo":  # preference records, not running text
        return build_preference(cfg, progress=progress)
    if cfg.data.mixture:
        return _build_mixture(cfg, progress)
    path = prepare_data(cfg.data, progress=progress)
    manifest = read_manifest(path)
    if manifest is None:  # prepare() just validated it; only a concurrent delete gets here
        raise DataError(f"{path}: manifest.json is missing or unreadable")

    if manifest["kind"] == "image":
        arrays = load_digits_arrays(path)
        sets = {s: ArrayDataset(arrays[f"x_{s}"], arrays[f"y_{s}"]) if len(arrays[f"y_{s}"])
                else None for s in ("train", "val", "test")}
        return Data(kind="image", path=path, **sets, num_classes=manifest["num_classes"],
                    input_shape=tuple(manifest["input_shape"]), manifest=manifest)

    chat = manifest.get("format") == "chat"
    if chat:
        check_chat_masking(cfg.data, manifest)

    def windows(split: str):
        if manifest["splits"][split]["tokens"] == 0:  # fraction 0: no such split
            return None
        if chat:  # whole conversations per window, targets masked (chat_windows.py)
            return ChatWindows(path / f"{split}.bin", manifest["dtype"], cfg.model.seq_len,
                               manifest["eot_id"], cfg.data.chat_packing)
        return TokenWindows(path / f"{split}.bin", manifest["dtype"], cfg.model.seq_len)

    tok = Tokenizer.load(path / manifest["tokenizer"])
    return Data(kind="text", path=path, train=windows("train"), val=windows("val"),
                test=windows("test"), tokenizer=tok, vocab_size=tok.vocab_size,
                manifest=manifest)


def build_preference(cfg: Config, *, progress: bool) -> Data:
    """Prepare and open the preference pairs of `cfg.data` (train.objective = "dpo"):
    splits of `PreferencePairs`, truncated to `cfg.model.seq_len`."""
    path = prepare_preference(cfg.data, preference_keys(cfg.dpo), progress=progress)
    manifest = read_manifest(path)
    if manifest is None:  # only a concurrent delete gets here
        raise DataError(f"{path}: manifest.json is missing or unreadable")
    tok = Tokenizer.load(path / manifest["tokenizer"])
    sets = {s: PreferencePairs(path, s, cfg.model.seq_len, tok.eot_id)
            if manifest["splits"][s]["pairs"] else None for s in ("train", "val", "test")}
    return Data(kind="text", path=path, **sets, tokenizer=tok, vocab_size=tok.vocab_size,
                manifest=manifest)


def _build_mixture(cfg: Config, progress: bool) -> Data:
    """Each source prepared on its own with one tokenizer (data/mixture_prepare.py);
    every split is a `MixtureWindows` of the sources' splits (None when a fraction is
    0), which the loader draws in the mixture's proportions."""
    mix = prepare_mixture(cfg.data, progress=progress)
    manifests = []
    for p in mix.paths:
        m = read_manifest(p)
        if m is None:  # prepare_text just validated it; only a concurrent delete gets here
            raise DataError(f"{p}: manifest.json is missing or unreadable")
        manifests.append(m)

    fraction = {"train": 1.0, "val": cfg.data.val_fraction, "test": cfg.data.test_fraction}
    need = cfg.model.seq_len + 1  # tokens of one window

    def windows(split: str):
        if fraction[split] == 0:  # no such split
            return None
        # A small source can get no document of a val/test split (the split is drawn
        # by content hash): it is left out of that split's evaluation, which then has
        # no loss_by_source entry for it. Without train windows it cannot be mixed.
        have = [i for i, m in enumerate(manifests) if m["splits"][split]["tokens"] >= need]
        if split == "train" and len(have) < len(manifests):
            bad = next(i for i in range(len(manifests)) if i not in have)
            raise DataError(f"data.mixture source '{mix.names[bad]}' ({mix.paths[bad]}) has "
                            f"fewer than seq_len+1={need} train tokens")
        if not have:
            return None
        return MixtureWindows(
            [TokenWindows(mix.paths[i] / f"{split}.bin", manifests[i]["dtype"],
                          cfg.model.seq_len) for i in have],
            [mix.names[i] for i in have], [mix.weights[i] for i in have])

    tok = Tokenizer.load(mix.tokenizer)
    manifest = {"kind": "text", "mixture": [
        {"name": n, "weight": w, "path": str(p), "sources": m.get("sources", [])}
        for n, w, p, m in zip(mix.names, mix.weights, mix.paths, manifests)]}
    return Data(kind="text", path=mix.paths[0], train=windows("train"),
                val=windows("val"), test=windows("test"), tokenizer=tok,
                vocab_size=tok.vocab_size, manifest=manifest)
