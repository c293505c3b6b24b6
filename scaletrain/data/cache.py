"""The prepared-data cache: content keys, validity checks and atomic publication.

A prepared dataset lives in `<prepared_dir>/<slug>-<key[:12]>/`, where the key hashes the
input fingerprint, every setting that changes the output and the format version. A
directory is only ever made visible by `os.replace` of a finished temporary directory,
so a crash mid-preparation leaves no half-written dataset that looks valid, and two
processes preparing the same key at once both end up using one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
"""Bump when the layout or meaning of prepared files changes: old caches become misses."""

MANIFEST = "manifest.json"


def cache_key(inputs: Any, settings: dict) -> str:
    """sha256 hex of the canonical JSON of (format version, inputs, settings)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, "inputs": inputs,
                       "settings": settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_manifest(path: Path) -> dict | None:
    """The manifest of a prepared dir, or None if missing or unreadable."""
    try:
        with open(path / MANIFEST, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def valid_manifest(path: Path, key: str) -> dict | None:
    """The manifest if `path` holds a complete dataset for `key`, else None.

    Checks the key, the format version and that every listed file exists with the size
    the manifest says; it does not re-hash file contents (that is what `verify` is for),
    so a cache hit stays cheap.
    """
    m = read_manifest(path)
    if m is None or m.get("key") != key or m.get("format_version") != FORMAT_VERSION:
        return None
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, info in files.items():
        p = path / name
        if not p.is_file() or p.stat().st_size != info.get("bytes"):
            return None
    return m


def verify(path: Path) -> list[str]:
    """Names of the files of a prepared dir whose sha256 differs from the manifest's."""
    m = read_manifest(path) or {}
    return [name for name, info in m.get("files", {}).items()
            if not (path / name).is_file() or sha256_file(path / name) != info["sha256"]]


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(path: Path, manifest: dict) -> None:
    """Write manifest.json, listing size and sha256 of every other file under 'files'."""
    manifest = dict(manifest)
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(path.iterdir())
                         if p.is_file() and p.name != MANIFEST}
    with open(path / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def build_cached(final: Path, key: str, build: Callable[[Path], dict]) -> Path:
    """Return `final` if it is valid for `key`; otherwise build it atomically.

    `build(tmp)` writes the dataset files into the empty directory `tmp` and returns the
    manifest (without 'files', which is filled in here).
    """
    if valid_manifest(final, key) is not None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = build(tmp)
        manifest.update(key=key, format_version=FORMAT_VERSION)
        write_manifest(tmp, manifest)
        if final.exists() and valid_manifest(final, key) is None:
            shutil.rmtree(final)  # a stale or broken copy of this key (e.g. a crash)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process published the same key first (the target is non-empty).
            if valid_manifest(final, key) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
