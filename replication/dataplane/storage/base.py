"""The storage interface the data plane writes to, and the errors it raises.

One ``Storage`` holds two kinds of things:

* **cache objects**: the replication logs the process server uploads and the apply engine's
  state. Keys are ``/``-separated paths (``logs/<item>/<seq>.lbs``). A put is atomic (a reader
  sees the old object or the new one, never a mix) and idempotent (putting the same bytes
  again changes nothing).
* **replica disks** with **snapshots**. A disk is a fixed-size byte range; writes are
  512-byte aligned (the unit of a page blob and of the wire format); reads may be any range
  inside the disk. A snapshot freezes the bytes a disk had when it was taken; later writes
  never change them. Writes become durable at ``flush_disk`` (``snapshot_disk`` flushes
  first); a crash may lose unflushed writes, never a snapshot's bytes.

A disk is written by one process at a time (the apply engine of its protected item, which
holds the item's lock); any process may read snapshots.

Backends: ``local.LocalStorage`` (a directory) and ``azure.AzureStorage`` (one container:
block blobs for objects, page blobs and blob snapshots for disks).
"""
from __future__ import annotations

import abc
import re
from typing import Iterator

from ..buffers import BufferPool, Held

SECTOR = 512
MAX_PAGE_WRITE = 4 * 1024 * 1024  # the largest single page write Azure accepts

_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:=+@-]*$")
_DISK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_KEY_LENGTH = 900
MAX_DISK_NAME_LENGTH = 200


class StorageError(Exception):
    """A storage operation failed; the message says which and why."""


class NotFound(StorageError):
    pass


class ObjectNotFound(NotFound):
    pass


class DiskNotFound(NotFound):
    pass


class SnapshotNotFound(NotFound):
    pass


class DiskExists(StorageError):
    pass


class InvalidRequest(StorageError, ValueError):
    """The caller asked for something the contract does not allow (bad name, misaligned or
    out-of-range I/O, bad size)."""


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidRequest("object key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"object key is {len(key)} characters, over the {MAX_KEY_LENGTH} limit")
    for segment in key.split("/"):
        if not _KEY_SEGMENT.match(segment):
            raise InvalidRequest(
                f"object key {key!r}: segment {segment!r} must be non-empty, start with a letter, "
                "digit or '_' and use only letters, digits and ._:=+@-"
            )
    return key


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise InvalidRequest("prefix must be a string")
    if prefix.startswith("/") or "//" in prefix or "\x00" in prefix:
        raise InvalidRequest(f"invalid prefix {prefix!r}")
    return prefix


def check_disk_name(name: str) -> str:
    if not isinstance(name, str) or not _DISK_NAME.match(name) or len(name) > MAX_DISK_NAME_LENGTH:
        raise InvalidRequest(
            f"disk name {name!r} must be 1-{MAX_DISK_NAME_LENGTH} characters of letters, digits "
            "and ._- starting with a letter or digit"
        )
    return name


def check_disk_size(size_bytes: int) -> int:
    if not isinstance(size_bytes, int) or size_bytes <= 0 or size_bytes % SECTOR:
        raise InvalidRequest(f"disk size {size_bytes!r} must be a positive multiple of {SECTOR} bytes")
    return size_bytes


def check_write(name: str, offset: int, length: int, disk_size: int) -> None:
    if offset < 0 or offset % SECTOR or length % SECTOR:
        raise InvalidRequest(
            f"write to disk {name!r} at {offset}+{length} is not {SECTOR}-byte aligned"
        )
    if offset + length > disk_size:
        raise InvalidRequest(
            f"write to disk {name!r} at {offset}+{length} ends past the disk's {disk_size} bytes"
        )


def check_read(name: str, offset: int, length: int, disk_size: int) -> None:
    if offset < 0 or length < 0 or offset + length > disk_size:
        raise InvalidRequest(
            f"read of disk {name!r} at {offset}+{length} is outside its {disk_size} bytes"
        )


class Storage(abc.ABC):
    """Cache objects, replica disks and their snapshots (see the module docstring)."""

    # -- cache objects -------------------------------------------------------------------
    @abc.abstractmethod
    def put_object(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``key``, replacing any object there, atomically."""

    def put_object_file(self, key: str, path: str) -> None:
        """Store the contents of the file at ``path`` under ``key``, as ``put_object`` does.
        The file must already be durable (fsync'd) and must not change afterwards; it stays
        in place. Backends that can take the file over without copying do so."""
        with open(path, "rb") as f:
            self.put_object(key, f.read())

    @abc.abstractmethod
    def get_object(self, key: str) -> bytes:
        """The object's bytes; ``ObjectNotFound`` if there is none."""

    def get_object_into(self, key: str, pool: BufferPool) -> Held:
        """The object's bytes, held (in a buffer of ``pool`` where the backend can read
        into one) until released: for objects read once on a hot path, the logs."""
        data = self.get_object(key)
        return Held(data, len(data))

    @abc.abstractmethod
    def list_objects(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (a plain string prefix), sorted."""

    @abc.abstractmethod
    def delete_object(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    # -- replica disks -------------------------------------------------------------------
    @abc.abstractmethod
    def create_disk(self, name: str, size_bytes: int) -> None:
        """Create a zero-filled disk; ``DiskExists`` if one has that name."""

    @abc.abstractmethod
    def disk_size(self, name: str, *, snapshot: str | None = None) -> int:
        """The disk's size now, or as of ``snapshot``."""

    @abc.abstractmethod
    def resize_disk(self, name: str, size_bytes: int) -> None:
        """Grow or shrink; grown space reads as zeros. Snapshots keep their own size."""

    @abc.abstractmethod
    def write_disk(self, name: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (both 512-byte aligned, inside the disk)."""

    @abc.abstractmethod
    def flush_disk(self, name: str) -> None:
        """Make every write so far durable."""

    @abc.abstractmethod
    def read_disk(self, name: str, offset: int, length: int, *, snapshot: str | None = None) -> bytes:
        """``length`` bytes at ``offset`` of the disk now, or as of ``snapshot``."""

    @abc.abstractmethod
    def delete_disk(self, name: str) -> None:
        """Remove the disk and all its snapshots; removing a missing disk is not an error."""

    @abc.abstractmethod
    def disk_exists(self, name: str) -> bool:
        """Whether a disk has that name."""

    # -- snapshots -----------------------------------------------------------------------
    @abc.abstractmethod
    def snapshot_disk(self, name: str) -> str:
        """Flush the disk and freeze its current bytes; returns the snapshot's id."""

    @abc.abstractmethod
    def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        """Remove one snapshot and free what only it used; a missing one is not an error."""

    @abc.abstractmethod
    def list_snapshots(self, name: str) -> list[str]:
        """The disk's snapshot ids, oldest first."""

    # -- accounting ----------------------------------------------------------------------
    @abc.abstractmethod
    def used_bytes(self, prefix: str = "") -> int:
        """Bytes the storage holds for objects whose key, and disks (with their snapshots)
        whose name, start with ``prefix``."""

    # -- helpers -------------------------------------------------------------------------
    def iter_disk(
        self, name: str, *, snapshot: str | None = None, chunk_bytes: int = 4 * 1024 * 1024
    ) -> Iterator[bytes]:
        """The whole disk (or snapshot) as consecutive pieces of at most ``chunk_bytes``."""
        if chunk_bytes <= 0:
            raise InvalidRequest("chunk_bytes must be positive")
        size = self.disk_size(name, snapshot=snapshot)
        offset = 0
        while offset < size:
            length = min(chunk_bytes, size - offset)
            yield self.read_disk(name, offset, length, snapshot=snapshot)
            offset += length

    def close(self) -> None:
        """Release open files and connections."""

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
