"""Directories replaced as a whole, so that a crash (SIGKILL, power loss, a full disk) never leaves a half-written one.

:func:`replace_directory` writes the new version into ``<name>.tmp`` beside the directory, flushes it to disk, then
swaps it in with two renames: the current version to ``<name>.old``, the new one to ``<name>``; last, ``<name>.old``
is removed. At every moment a complete version is on disk: ``<name>``, or between the two renames ``<name>.old``
with the complete new one still in ``<name>.tmp``. :func:`recover_directory` puts the newest complete version back
in place after a crash and removes what is left over.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

STAGING, PREVIOUS = ".tmp", ".old"


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def _sync(path: Path) -> None:
    """Flush a file or a directory's entries to disk (renames only survive power loss once their directory is)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def replace_directory(directory: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace ``directory`` (or create it) with what ``write(staging)`` writes into an empty staging directory.

    If ``write`` fails (a full disk, a read-only file system), the staging directory is removed and ``directory``
    stays as it was; the error propagates.
    """
    directory = Path(directory)
    staging, previous = _sibling(directory, STAGING), _sibling(directory, PREVIOUS)
    recover_directory(directory)
    try:
        staging.mkdir(parents=True)
        write(staging)
        for path in staging.rglob("*"):
            _sync(path)
        _sync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replacing = directory.exists()
    if replacing:
        os.replace(directory, previous)
    os.replace(staging, directory)
    _sync(directory.parent)
    if replacing:
        shutil.rmtree(previous)


def recover_directory(directory: str | os.PathLike) -> None:
    """Undo what a crash in :func:`replace_directory` left: afterwards ``directory`` holds the newest complete version
    written (or does not exist if none was), and no staging or previous version is left beside it."""
    directory = Path(directory)
    staging, previous = _sibling(directory, STAGING), _sibling(directory, PREVIOUS)
    if previous.exists() and not directory.exists():
        # crashed between the two renames: the staged version was complete before the first one
        os.replace(staging, directory)
        _sync(directory.parent)
    shutil.rmtree(previous, ignore_errors=True)  # crashed before removing it: the version in place is newer
    shutil.rmtree(staging, ignore_errors=True)  # crashed while writing it, or before swapping it in: not trusted
