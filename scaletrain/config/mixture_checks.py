"""Rules of `data.source` as a list and of `data.mixture` (issue 16), judged before any
preparation or launch: one line naming the field, the entry and what is wrong.

The sources of a list or a mixture are also checked to exist here (a path that is
missing, a glob that matches nothing), with the nearest name in its directory, so that
`--nproc N` does not start N processes that each fail on the same typo.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import re
from pathlib import Path

from scaletrain.errors import ConfigError

BUILTIN_TEXT = "python-stdlib"
DIGITS = "digits"
DEFAULT_SOURCE = BUILTIN_TEXT  # data.source's default: "not set" when a mixture is
ENTRY_KEYS = ("source", "weight", "name")
_GLOB_MAGIC = re.compile(r"[*?[]")


def source_name(source: str) -> str:
    """The default metrics name of a source: the base name of its path (of the part
    before any glob character), in characters safe for a metrics tag."""
    if source == BUILTIN_TEXT:
        return source
    base = Path(_GLOB_MAGIC.split(source)[0].rstrip("/")).name or "source"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "source"


def mixture_names(entries: list[dict]) -> list[str]:
    """Each entry's metrics name (its `name`, else `source_name` of its source)."""
    return [e.get("name") or source_name(e["source"]) for e in entries]


def check_sources(dcfg) -> None:
    """data.source (a string or a non-empty list of text sources) and data.mixture."""
    if isinstance(dcfg.source, list):
        _check_list(dcfg.source)
    if dcfg.mixture:
        if dcfg.format != "text":
            raise ConfigError(f"data.mixture mixes text sources; data.format="
                              f"'{dcfg.format}' is not supported with it")
        _check_mixture(dcfg)


def _check_list(sources: list) -> None:
    if not sources:
        raise ConfigError("data.source: an empty list; name at least one source")
    for i, s in enumerate(sources):
        key = f"data.source[{i}]"
        if not isinstance(s, str) or not s:
            raise ConfigError(f"{key}: expected a non-empty string, got {s!r}")
        if s == DIGITS:
            raise ConfigError(f"{key}: 'digits' is an image data set; a list holds text "
                              "sources only")
        if sources.index(s) != i:
            raise ConfigError(f"{key}: '{s}' is listed twice")
        _check_exists(key, s)


def _check_mixture(dcfg) -> None:
    entries = dcfg.mixture
    if dcfg.source != DEFAULT_SOURCE:
        raise ConfigError("data.mixture and data.source are both set; a mixture names its "
                          "sources itself (leave data.source unset)")
    for i, e in enumerate(entries):
        key = f"data.mixture[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{key}: expected a table {{source = \"...\", weight = ...}}, "
                              f"got {e!r}")
        for k in e:
            if k not in ENTRY_KEYS:
                close = difflib.get_close_matches(k, ENTRY_KEYS, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{key}: unknown key '{k}'{hint}; an entry has "
                                  f"{', '.join(ENTRY_KEYS)}")
        s = e.get("source")
        if not isinstance(s, str) or not s:
            raise ConfigError(f"{key}.source: expected a non-empty string, got {s!r}")
        if s == DIGITS:
            raise ConfigError(f"{key}.source: 'digits' is an image data set; a mixture "
                              "holds text sources only")
        w = e.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or w <= 0:
            raise ConfigError(f"{key}.weight: must be a number > 0, got {w!r}")
        name = e.get("name", "")
        if not isinstance(name, str) or (name and not re.fullmatch(r"[A-Za-z0-9._-]+",
                                                                    name)):
            raise ConfigError(f"{key}.name: {name!r} is not a name of letters, digits, "
                              "'.', '_' or '-' (it becomes a metrics tag)")
        _check_exists(f"{key}.source", s)
    names = mixture_names(entries)
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ConfigError(f"data.mixture[{i}]: a second source named '{n}' (entry "
                              f"{names.index(n)} has it); give one a name = \"...\"")


def _check_exists(key: str, source: str) -> None:
    """A path that is missing or a glob that matches nothing: one line, with the nearest
    name in the directory it points into."""
    if source == BUILTIN_TEXT:
        return
    if _GLOB_MAGIC.search(source):
        if next(glob.iglob(source, recursive=True), None) is None:
            raise ConfigError(f"{key}: the pattern '{source}' matches no files")
        return
    p = Path(source)
    if p.exists():
        return
    hint = ""
    if p.parent.is_dir():
        close = difflib.get_close_matches(p.name, os.listdir(p.parent), n=1, cutoff=0.5)
        if close:
            hint = f" (did you mean '{p.parent / close[0]}'?)"
    raise ConfigError(f"{key}: '{source}' does not exist{hint}")
