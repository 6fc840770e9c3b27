"""Durable, all-or-nothing writes (a file or directory is complete under its final name), outputs
set aside rather than deleted, file digests, and files checked against what was recorded of them.

Write under a temporary name, fsync the data, rename (atomic on POSIX file systems), then fsync
the parent directory so the rename itself survives a crash:

    temporary = temporary_directory(final)     # final.tmp, emptied of a killed writer's leftovers
    ... write into temporary ...
    publish_directory(temporary, final)        # fsync every file, rename, fsync the parent

Outputs a new run replaces are moved beside themselves with ``set_aside`` (``name.<why>-<time>``),
never deleted: a user's earlier checkpoints or exports are theirs to remove.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks (model shards and tars do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_problems(root: Path, recorded, hashes: bool, source: str) -> list[str]:
    """What differs between the files below ``root`` and what ``source`` (a file list, a manifest)
    recorded of them: for each ``(name, size, sha256)`` in ``recorded``, the file missing, of
    another size, or with ``hashes`` of another sha256 (a size or sha256 of None was not recorded)."""
    problems = []
    for name, size, digest in recorded:
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{name} is {path.stat().st_size} bytes, {source} says {size}")
        elif hashes and digest is not None and sha256_of(path) != digest:
            problems.append(f"{name} is corrupted (its sha256 differs from the one {source} records)")
    return problems


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (a checkpoint before its rename)."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as stream:
                os.fsync(stream.fileno())
        fsync_directory(Path(directory))


def fsync_rename(temporary: Path, final: Path) -> None:
    """Make ``temporary`` (a file or a fsynced tree) durable and give it its final name."""
    if temporary.is_file():
        with temporary.open("rb") as stream:
            os.fsync(stream.fileno())
    os.replace(temporary, final)
    fsync_directory(final.parent)


def write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    fsync_rename(temporary, path)


def temporary_directory(final: Path, writer: str = "a writer") -> Path:
    """An empty ``<final>.tmp`` beside ``final``; one left by a killed ``writer`` is removed first."""
    temporary = final.with_name(final.name + ".tmp")
    if temporary.exists():
        logger.warning("removing %s, left by %s that did not finish", temporary, writer)
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def publish_directory(temporary: Path, final: Path) -> None:
    """fsync everything under ``temporary``, then give it its final name atomically."""
    fsync_tree(temporary)
    fsync_rename(temporary, final)


def aside_path(path: Path, why: str) -> Path:
    """``<name>.<why>-<YYYYmmdd-HHMMSS>`` beside ``path``, a name not taken yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, number = path.with_name(f"{path.name}.{why}-{stamp}"), 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{why}-{stamp}-{number}")
    return candidate


def set_aside(path: Path, why: str) -> Path:
    """Move ``path`` to ``aside_path(path, why)``, kept, never deleted; returns where it went."""
    kept = aside_path(path, why)
    os.replace(path, kept)
    return kept
