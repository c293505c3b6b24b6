"""Which files a text source names, and their fingerprint for the preparation cache.

A source is 'python-stdlib' (the `.py` files of this interpreter's standard library), a
directory (every regular file below it), a single file, or a glob pattern. A directory
written by `datasets.Dataset.save_to_disk` (state.json naming its Arrow files) is read as
its Arrow files. Each file's format comes from its name (`file_format`): JSONL
(`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), Parquet, Arrow, or else one text document. Files are
always returned sorted by their path relative to the source's root, so that everything
downstream (dedup keeps the first copy, `max_files` takes a prefix) is deterministic.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from scaletrain.errors import DataError

STDLIB = "python-stdlib"
_THIRD_PARTY = {"site-packages", "dist-packages"}
_GLOB_MAGIC = re.compile(r"[*?[]")
# Formats of a source file, told by the end of its name; everything else is TEXT.
TEXT, JSONL, PARQUET, ARROW = "text", "jsonl", "parquet", "arrow"
_SUFFIXES = ((".jsonl", JSONL), (".jsonl.gz", JSONL), (".jsonl.zst", JSONL),
             (".parquet", PARQUET), (".arrow", ARROW))


def file_format(path: Path) -> str:
    """The format of a source file by its name: one record per line (JSONL, plain or
    compressed), a Parquet or Arrow table of records, or else one text document."""
    name = path.name.lower()
    return next((fmt for suffix, fmt in _SUFFIXES if name.endswith(suffix)), TEXT)


def saved_dataset_files(path: Path) -> list[Path] | None:
    """The Arrow files of a `datasets.Dataset.save_to_disk` directory, in its own order,
    or None when `path` is not one (its state.json lists them under `_data_files`)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [path / n for n in names] if names else None


@dataclass(frozen=True)
class InputFiles:
    """The files of a source: `root` is what `rel` paths are relative to."""

    source: str
    root: Path
    files: tuple[Path, ...]

    def rel(self, path: Path) -> str:
        """The path of `path` relative to the root, with '/' separators."""
        return path.relative_to(self.root).as_posix()

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(relative path, size, mtime_ns) per file: cheap, and changes when a file does.

        Used for the cache key instead of content hashes so that a cache hit costs one
        `stat` per file, not a read of the whole corpus.
        """
        out = []
        for p in self.files:
            st = p.stat()
            out.append((self.rel(p), st.st_size, st.st_mtime_ns))
        return out


def list_text_files(source: str, max_files: int = 0,
                    exclude: Path | None = None) -> InputFiles:
    """Resolve `source` to its sorted input files (the first `max_files` if > 0), leaving
    out every file below `exclude` (the prepared-data directory when it lies inside the
    source: its own output must not become input, nor change the source's cache key).

    Raises DataError when the path does not exist, matches nothing, or holds no files.
    """
    inputs = _list_text_files(source, max_files if exclude is None else 0)
    if exclude is None:
        return inputs
    out = Path(exclude).absolute()
    files = [p for p in inputs.files if not p.absolute().is_relative_to(out)]
    if not files:
        raise DataError(f"{source}: the data source holds no files besides the prepared "
                        f"data in {exclude}")
    return InputFiles(source=inputs.source, root=inputs.root,
                      files=tuple(files[:max_files] if max_files > 0 else files))


def _list_text_files(source: str, max_files: int = 0) -> InputFiles:
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"]).resolve()
        files = [p for p in _walk(root, skip_dirs=_THIRD_PARTY) if p.suffix == ".py"]
        if not files:
            raise DataError(f"{root}: no .py files in the Python standard library")
    elif _GLOB_MAGIC.search(source):
        # The root is the longest leading part of the pattern without glob characters.
        parts = Path(source).parts
        n = next(i for i, s in enumerate(parts) if _GLOB_MAGIC.search(s))
        # absolute(), not resolve(): a symlinked file must stay below the root.
        root = Path(*parts[:n]).absolute() if n else Path.cwd()
        files = [Path(p).absolute() for p in glob.glob(source, recursive=True)]
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataError(f"{source}: the pattern matches no files")
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{source}: data source not found (no such file or directory)")
        path = path.resolve()
        if path.is_file():
            root, files = path.parent, [path]
        elif (saved := saved_dataset_files(path)) is not None:
            root, files = path, [p for p in saved if p.is_file()]
            if len(files) < len(saved):
                raise DataError(f"{source}: a saved dataset whose Arrow files are missing")
            # Already in the dataset's row order (data-00000-of-N, ...): keep it.
            return InputFiles(source=source, root=root,
                              files=tuple(files[:max_files] if max_files > 0 else files))
        else:
            root, files = path, list(_walk(path))
            if not files:
                raise DataError(f"{source}: the data directory contains no files")
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_files > 0:
        files = files[:max_files]
    return InputFiles(source=source, root=root, files=tuple(files))


def _walk(root: Path, skip_dirs: set[str] = frozenset()):
    """Every regular file below `root`, not entering directories named in `skip_dirs`.

    Symlinked directories are not followed (they can form cycles).
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]  # prune, don't descend
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_file():
                yield p


def slug(source: str) -> str:
    """A short, filesystem-safe name for the source, the first part of the cache dir."""
    if source == STDLIB:
        return STDLIB
    # Of the absolute spelling: saved configs record sources absolute (config/paths.py),
    # and `corpus/*.txt` must name the same cache as `/home/me/corpus/*.txt`.
    source = os.path.abspath(os.path.expanduser(source))
    base = Path(_GLOB_MAGIC.split(source)[0]).name or Path(source).name
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")
    return s[:40] or "text"
