"""Durable, all-or-nothing file writes: a file or directory is complete under its final name.

Write under a temporary name, fsync the data, rename (atomic on POSIX file systems), then fsync
the parent directory so the rename itself survives a crash.
"""

from __future__ import annotations

import os
from pathlib import Path


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
