"""Path fields of a config, made absolute when the config is built.

A relative path means "relative to the directory I ran the command in", and that
directory is not recorded anywhere. A run's saved `config.toml` is read again later —
by `eval`, `generate`, `export`, a resume, a fine-tune's `init.from` — from wherever the
user stands then; a relative `data.prepared_dir` would then name a new, empty cache there
and `eval` would silently prepare the corpus again (issue 13 item 7). Resolving each path
once, against the working directory of the command that names it, makes the saved config
mean the same thing from every directory. (`run.dir` is left as written: it is the run's
own location, which the user may move, and every command that reads a run is given it.)
"""

from __future__ import annotations

import os

# (section, field, values that are names rather than paths)
PATH_FIELDS = (
    ("data", "source", ("python-stdlib", "digits")),
    ("data", "prepared_dir", ()),
    ("data", "tokenizer", ()),
    ("init", "from_", ()),
    ("distill", "teacher", ()),
    ("checkpoint", "resume", ("auto", "none")),
)


def absolute(path: str) -> str:
    """`path` with `~` expanded, made absolute against the current directory. Glob
    patterns stay patterns (only the text is joined, nothing is matched)."""
    return os.path.abspath(os.path.expanduser(path))


def resolved(section: str, name: str, value):
    """`value` of field `section.name` as `resolve_paths` would leave it (unchanged for
    fields that are not paths): for comparing with configs saved before paths were made
    absolute, which were relative to the directory they were run in — like now."""
    for sec, field, names in PATH_FIELDS:
        if (sec, field) == (section, name) and isinstance(value, str) and value \
                and value not in names:
            return absolute(value)
    return value


def resolve_paths(cfg) -> None:
    """Make every path field of `cfg` absolute, in place; empty values stay empty (they
    mean "unset", and validation reports the ones that must not be)."""
    for section, name, _ in PATH_FIELDS:
        sec = getattr(cfg, section)
        setattr(sec, name, resolved(section, name, getattr(sec, name)))
