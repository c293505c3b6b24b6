"""The data a model directory is measured on: the config's corpus, encoded with the
directory's own tokenizer.

Token ids only mean something to the weights trained on them. A run, an artefact or an
exported Hugging Face directory therefore brings its `tokenizer.json`, and `eval` /
`compress` encode with it — never with a tokenizer trained afresh on the data (issue 13
item 6: an export evaluated on a new corpus reported 8.38 with a new BPE, 5.34 with its
own), and never with a path recorded at training time that may be gone by now (item 7:
a fine-tune's config names its base run's tokenizer, which moves with the base).
"""

from __future__ import annotations

import copy
from pathlib import Path

from scaletrain.data.build import Data, build_data
from scaletrain.data.prepare import cached_text_dir
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.data.vision import DIGITS
from scaletrain.errors import ConfigError, DataError
from scaletrain.config.run_files import TOKENIZER_FILE


def data_for_model(cfg, model_dir: str | Path, tokenizer: Tokenizer | None,
                   asked_tokenizer: str = "", *, progress: bool = False) -> Data:
    """Open `cfg.data` encoded with `tokenizer`, the one loaded from `model_dir`.

    `asked_tokenizer` is a `--data.tokenizer` the user gave on this command line: it is
    honoured only for a directory without a tokenizer of its own, and refused when it
    differs from the directory's. A run's data already prepared with the same tokenizer
    (the usual case: the run trained the tokenizer on it) is reused, not prepared again.
    """
    if cfg.data.source == DIGITS:
        return build_data(cfg, progress=progress)
    own = Path(model_dir) / TOKENIZER_FILE
    if tokenizer is None:
        if asked_tokenizer:  # nothing to check it against: the user's word
            return build_data(cfg, progress=progress)
        raise DataError(f"'{model_dir}' has no usable {TOKENIZER_FILE}: a text model must "
                        "be measured with the tokenizer it was trained with; pass it as "
                        "--data.tokenizer=FILE")
    if asked_tokenizer and not _same(Tokenizer.load(asked_tokenizer), tokenizer):
        raise ConfigError(f"data.tokenizer: '{asked_tokenizer}' is not the tokenizer of "
                          f"'{model_dir}' ({own}), which its weights were trained with")
    cfg = copy.deepcopy(cfg)
    if not cfg.data.tokenizer:
        cached = cached_text_dir(cfg.data)  # the corpus as the run itself prepared it
        if cached is not None and _same(Tokenizer.load(cached / TOKENIZER_FILE), tokenizer):
            return build_data(cfg, progress=progress)
    # The cache is keyed by the tokenizer's content, not its path: a fine-tune's data,
    # prepared with its base's tokenizer, is found again through the run's own copy.
    cfg.data.tokenizer = str(own.resolve())
    return build_data(cfg, progress=progress)


def _same(a: Tokenizer, b: Tokenizer) -> bool:
    return a.to_str() == b.to_str()
