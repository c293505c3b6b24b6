"""Path-valued config fields (declared `F(..., path=True)` in config/schema.py): `~`
expanded, made absolute when the config is built, and the directories they name made
with a one-line error.

- `~`: the README quotes globs (`--data.source='~/corpus/**/*.txt'`) so that the shell
  does not expand `**`; the quotes keep the shell from expanding `~` as well, so it is
  expanded here, for the command line and config files alike.
- Absolute: a relative path means "relative to the directory I ran the command in", and
  that directory is not recorded anywhere. A run's saved `config.toml` is read again
  later — by `eval`, `generate`, `export`, a resume, a fine-tune's `init.from` — from
  wherever the user stands then; a relative `data.prepared_dir` would then name a new,
  empty cache there and `eval` would silently prepare the corpus again (issue 13 item 7).
  Resolving each path once, against the working directory of the command that names it,
  makes the saved config mean the same thing from every directory. `run.dir` is left
  relative: it is the run's own location, which the user may move, and every command
  that reads a run is given it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from scaletrain.config.schema import Config, sections
from scaletrain.errors import ConfigError

# Values of a path field that are names, not paths.
NAMES = {("data", "source"): ("python-stdlib", "digits"),
         ("data", "mixture"): ("python-stdlib", "digits"),
         ("checkpoint", "resume"): ("auto", "none")}
# Path fields whose `~` is expanded but which stay relative (see the module docstring).
KEPT_RELATIVE = {("run", "dir")}
# (section, field) of every path field, read from the schema's `path=True` marks.
PATH_FIELDS = frozenset((sec, f.name) for sec, section in sections(Config()).items()
                        for f in dataclasses.fields(section) if f.metadata.get("path"))


def absolute(path: str) -> str:
    """`path` with `~` expanded, made absolute against the current directory. Glob
    patterns stay patterns (only the text is joined, nothing is matched)."""
    return os.path.abspath(os.path.expanduser(path))


def resolved(section: str, name: str, value):
    """`value` of field `section.name` as `resolve_paths` leaves it (unchanged for fields
    that are not paths, names such as 'python-stdlib', and empty values, which mean
    "unset"). Also for comparing with configs saved before paths were made absolute,
    which were relative to the directory they were run in — like now."""
    if (section, name) in PATH_FIELDS and isinstance(value, (list, tuple)):
        # A list of sources, or data.mixture's tables: each source resolved alike.
        return [{**v, "source": resolved(section, name, v["source"])}
                if isinstance(v, dict) and isinstance(v.get("source"), str)
                else resolved(section, name, v) for v in value]
    if (section, name) not in PATH_FIELDS or not isinstance(value, str) or not value \
            or value in NAMES.get((section, name), ()):
        return value
    if (section, name) in KEPT_RELATIVE:
        return os.path.expanduser(value)
    return absolute(value)


def resolve_paths(cfg: Config) -> Config:
    """Resolve every path field of `cfg` in place (`resolved`); returns `cfg`."""
    for sec, name in PATH_FIELDS:
        section = getattr(cfg, sec)
        setattr(section, name, resolved(sec, name, getattr(section, name)))
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
