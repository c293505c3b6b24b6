"""`data.filters`: datatrove's own quality filters, by a short name, with `data.filter_args`
replacing some of their default thresholds.

The filters run as they are (pipeline steps of the read job, after cleaning); each
drops documents and counts them in its own step's stats, which `pipeline.py` reads back
per step into the manifest's stages (`dropped_<name>`). Word and sentence splitting is
datatrove's: spaCy's blank English pipeline, rules only, so nothing is downloaded when
they run. Filters that need a downloaded asset (C4's bad-words list, fastText language
or quality models) are not offered: `prepare` must work offline.
"""

from __future__ import annotations

import difflib
import inspect

from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter,
                                        GopherQualityFilter, GopherRepetitionFilter)
from datatrove.pipeline.filters.base_filter import BaseFilter

from scaletrain.errors import DataError

FILTERS: dict[str, type[BaseFilter]] = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}

# Arguments that are not thresholds: where dropped documents go (nowhere: they are
# counted) and the language, which picks the word tokenizer (English's needs no download).
_NOT_SETTABLE = ("self", "exclusion_writer", "language")


def _near(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def settable(name: str) -> list[str]:
    """The `data.filter_args.<name>` keys: its class's threshold arguments."""
    params = inspect.signature(FILTERS[name].__init__).parameters
    return [p for p in params if p not in _NOT_SETTABLE]


def _value(value):
    # TOML arrays arrive as lists; datatrove's defaults are tuples (e.g. top_n_grams).
    return tuple(_value(v) for v in value) if isinstance(value, list) else value


def check_filters(names: list[str], args: dict) -> list[tuple[str, dict]]:
    """[(name, keyword arguments)] of `data.filters` in order; DataError (one line, with
    the near name) for an unknown filter, a repeated one, or an unknown argument."""
    seen = set()
    for name in names:
        if name not in FILTERS:
            raise DataError(f"data.filters: unknown filter '{name}'{_near(name, FILTERS)}; "
                            f"choose from {', '.join(FILTERS)}")
        if name in seen:
            raise DataError(f"data.filters: '{name}' is listed twice")
        seen.add(name)
    if not isinstance(args, dict):
        raise DataError(f"data.filter_args: expected a table of tables, got {args!r}")
    for name, kwargs in args.items():
        if name not in seen:
            raise DataError(f"data.filter_args.{name}: '{name}' is not in data.filters "
                            f"{names}{_near(name, FILTERS)}")
        if not isinstance(kwargs, dict):
            raise DataError(f"data.filter_args.{name}: expected a table, got {kwargs!r}")
        for key in kwargs:
            if key not in settable(name):
                raise DataError(f"data.filter_args.{name}.{key}: not an argument of "
                                f"{FILTERS[name].__name__}{_near(key, settable(name))}; "
                                f"it takes {', '.join(settable(name))}")
    return [(n, {k: _value(v) for k, v in args.get(n, {}).items()}) for n in names]


def filter_steps(specs: list[tuple[str, dict]]) -> list[BaseFilter]:
    """The datatrove filter steps of `check_filters`' specs, in order."""
    steps = []
    for name, kwargs in specs:
        try:
            steps.append(FILTERS[name](**kwargs))
        except (TypeError, ValueError) as e:
            raise DataError(f"data.filter_args.{name}: {e}") from None
    return steps
