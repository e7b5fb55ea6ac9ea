"""Durable files: after a crash a file holds its old bytes or its new ones, never a mix.

The one implementation of write-temp, fsync, rename, fsync-the-directory, shared by the
mobility agent and the data plane (the process server's cache, local storage). Standard
library only: the agent runs on protected VMs without Django or the rest of Lifeboat.

A temporary file is a hidden sibling of the file it replaces (``TEMP_PREFIX``), so listings
that skip dot-files never see one, and a directory's owner can tell what a crash left
behind from what it keeps.
"""
from __future__ import annotations

import errno
import os
import secrets
from typing import Callable

TEMP_PREFIX = ".tmp-"


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
    """Write all of ``data`` (at ``offset`` with pwrite, else at the file position)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        if offset is None:
            done += os.write(fd, view[done:])
        else:
            done += os.pwrite(fd, view[done:], offset + done)


def fsync_dir(path: str) -> None:
    """Make the directory's entries (a create, a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """Create ``path`` and any missing parents, fsyncing each new entry's parent."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    makedirs_durable(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", path) from None
        return
    fsync_dir(parent)


def temp_path(path: str) -> str:
    """A new hidden temporary name next to ``path``, to be renamed over it."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f"{TEMP_PREFIX}{base}-{secrets.token_hex(6)}")


def unlink_quietly(path: str) -> bool:
    """Remove a file; False if it was not there."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def create_durably(path: str, fill: Callable[[int], object], *, mode: int = 0o644) -> None:
    """Create ``path`` (it must not exist yet), let ``fill(fd)`` write it and fsync it; on any
    error the file is removed again. The directory entry is not fsync'd: the caller renames
    the file into place (``replace_durably``) or fsyncs the directory itself."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def replace_durably(path: str, data: bytes | bytearray | memoryview, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (write-temp, fsync, rename, fsync the directory): after
    a crash at any moment it holds the old bytes or the new ones."""
    tmp = temp_path(path)
    create_durably(tmp, lambda fd: write_all(fd, memoryview(data).cast("B")), mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")
