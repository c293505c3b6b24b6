"""Path-valued config fields: `~` expansion, and making a directory a field names.

A path field is declared `F(..., path=True)` (config/schema.py). The README quotes globs
(`--data.source='~/corpus/**/*.txt'`) so that the shell does not expand `**`; the quotes
keep the shell from expanding `~` as well, so it is expanded here, for every path field
and for config files alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from scaletrain.config.schema import Config, sections
from scaletrain.errors import ConfigError


def expand_user(cfg: Config) -> Config:
    """Replace a leading `~` / `~user` of every path field by that home directory."""
    for section in sections(cfg).values():
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata.get("path") and isinstance(value, str) and value.startswith("~"):
                setattr(section, f.name, os.path.expanduser(value))
    return cfg


def blocking_file(path: str | os.PathLike) -> Path | None:
    """The existing non-directory at `path` or above it that keeps it from being a
    directory; None if `path` is (or can become) a directory."""
    p = Path(path).absolute()
    for q in (p, *p.parents):
        if q.exists():
            return None if q.is_dir() else q
    return None


def check_dir_field(field: str, path: str | os.PathLike) -> None:
    """ConfigError naming `field` when a file stands where its directory must be."""
    blocker = blocking_file(path)
    if blocker is None:
        return
    if blocker == Path(path).absolute():
        raise ConfigError(f"{field}: '{path}' is an existing file, not a directory; "
                          "choose another path")
    raise ConfigError(f"{field}: '{path}' cannot be a directory: '{blocker}' is a file")


def make_dir(field: str, path: str | os.PathLike) -> Path:
    """Create directory `path` (and its parents); ConfigError naming `field` if a file
    is in the way or it cannot be created."""
    check_dir_field(field, path)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{field}: cannot create the directory '{path}' "
                          f"({e.strerror or e})") from None
    return Path(path)
