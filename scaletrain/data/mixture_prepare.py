"""Preparing `data.mixture`: each source its own cached directory, one tokenizer.

Token ids must mean the same in every source, so all sources are encoded with one
tokenizer: `data.tokenizer` when given, else the BPE trained on the sources together
(the list form `data.source = [...]`, prepared once and cached; its tokenizer.json is
then `data.tokenizer` of each source). Each source's directory is keyed by that
tokenizer's content (prepare.py), so adding a source to a mixture re-prepares the
union and the sources (a new tokenizer), and re-running one is a cache hit. The union's
own token files are not used for training (its tokenizer is what is needed from it);
that tokenizing pass is the price of a tokenizer trained on every source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config.mixture_checks import mixture_names
from scaletrain.config.schema import DataConfig
from scaletrain.data.prepare import prepare_text


@dataclass
class PreparedMixture:
    """The prepared directories of a mixture's sources, in `data.mixture` order."""

    names: list[str]
    weights: list[float]
    paths: list[Path]
    tokenizer: Path
    union: Path | None  # the sources prepared together (for the tokenizer), if trained


def prepare_mixture(dcfg: DataConfig, *, progress: bool) -> PreparedMixture:
    """Prepare every source of `dcfg.mixture` (cache hits when done before)."""
    sources = [e["source"] for e in dcfg.mixture]
    base = dataclasses.replace(dcfg, mixture=[])
    union = None
    if dcfg.tokenizer:
        tokenizer = Path(dcfg.tokenizer)
    else:
        union = prepare_text(dataclasses.replace(base, source=sources), progress=progress)
        tokenizer = union / "tokenizer.json"
    paths = [prepare_text(dataclasses.replace(base, source=s, tokenizer=str(tokenizer)),
                          progress=progress) for s in sources]
    return PreparedMixture(mixture_names(dcfg.mixture),
                           [float(e["weight"]) for e in dcfg.mixture], paths, tokenizer,
                           union)
