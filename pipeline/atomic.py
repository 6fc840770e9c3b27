"""Durable, all-or-nothing file writes (a file or directory is complete under its final name),
and file digests.

Write under a temporary name, fsync the data, rename (atomic on POSIX file systems), then fsync
the parent directory so the rename itself survives a crash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_of(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks (model shards and tars do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
