"""The manifest of a checkpoint directory: what a complete, intact checkpoint holds.

`manifest.json` is written last, after every other file of the checkpoint is complete,
and lists each file with its size and SHA-256, the format version, the step and the
resolved config. A checkpoint is *valid* only if its manifest parses and every listed
file exists with that size and digest; nothing else in the directory is read before
that check passes (the DCP metadata is a pickle: see safe_load.py).

Plain JSON, so reading a manifest can never execute anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from scaletrain.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "scaletrain-checkpoint"
FORMAT_VERSION = 1
_CHUNK = 1 << 22  # 4 MiB reads: fast hashing without holding a 1 GB file in memory


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: Path, *, step: int, config: dict, world_size: int) -> dict:
    """Checksum every file under `ckpt_dir` and write `manifest.json` (atomically, last)."""
    files = {}
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(ckpt_dir).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step),
                "world_size": int(world_size), "files": files, "config": config}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / MANIFEST)
    return manifest


def read_manifest(ckpt_dir: Path) -> dict:
    """The parsed manifest of `ckpt_dir`; CheckpointError if missing or malformed."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a scaletrain checkpoint (no {MANIFEST})")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a scaletrain checkpoint manifest")
    if m.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {m.get('version')} is not "
                              f"supported (this scaletrain reads version {FORMAT_VERSION})")
    if not isinstance(m.get("files"), dict) or not isinstance(m.get("step"), int):
        raise CheckpointError(f"{path}: malformed manifest (no files or step)")
    return m


def verify(ckpt_dir: Path) -> dict:
    """Check every file of the manifest (presence, size, SHA-256); return the manifest.

    Raises CheckpointError naming the first missing, truncated or corrupt file.
    """
    m = read_manifest(ckpt_dir)
    for rel, info in m["files"].items():
        p = ckpt_dir / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing from the checkpoint")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"{p}: truncated or resized ({size} bytes, the manifest "
                                  f"says {info.get('bytes')})")
        if sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"{p}: corrupt (checksum does not match the manifest)")
    return m
