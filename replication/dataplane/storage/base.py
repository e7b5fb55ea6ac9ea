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
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from blake3 import blake3

from mobility.durable import unlink_quietly, write_all

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


# -- disk image digests ----------------------------------------------------------------------

DIGEST_ALGORITHM = "blake3"
HASH_PIECE = 32 * 1024 * 1024  # bytes handed to BLAKE3 at once: enough for all its threads
_ZEROS = memoryview(bytes(HASH_PIECE))


class ImageHasher:
    """BLAKE3 of a raw disk image, fed in order as data pieces and runs of zeros.

    ``digest()`` is ``"blake3:<hex>"``, the same as hashing the plain byte image (holes read
    as zeros), so a recovered flat file, a datastore download and a page blob can all be
    compared with a replica snapshot. Runs of zeros are hashed from a shared zero buffer,
    never read from anywhere. Big pieces are hashed on all cores (BLAKE3's own threads)."""

    __slots__ = ("_h", "length")

    def __init__(self) -> None:
        self._h = blake3(max_threads=blake3.AUTO)
        self.length = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.length += len(data)

    def zeros(self, count: int) -> None:
        while count > 0:
            take = min(count, HASH_PIECE)
            self._h.update(_ZEROS[:take])
            self.length += take
            count -= take

    def update_file(self, path: str) -> int:
        """Add a whole file's bytes (memory-mapped; holes cost no reads); their count."""
        size = os.path.getsize(path)
        if size:
            self._h.update_mmap(path)
        self.length += size
        return size

    def digest(self) -> str:
        return f"{DIGEST_ALGORITHM}:{self._h.hexdigest()}"


def digest_pieces(pieces: Iterable[bytes | bytearray | memoryview]) -> str:
    """The image digest of consecutive pieces of a disk (all-zero pieces included)."""
    h = ImageHasher()
    for piece in pieces:
        h.update(piece)
    return h.digest()


def digest_flat_file(path: str, size_bytes: int | None = None) -> str:
    """The image digest of a flat (possibly sparse) disk file of ``size_bytes`` (default:
    the file's size; a shorter file reads as zeros past its end, a longer one is an error).
    Holes are not read: the file is memory-mapped, and holes map to zero pages."""
    actual = os.path.getsize(path)
    size = actual if size_bytes is None else size_bytes
    h = ImageHasher()
    if actual <= size:
        actual = h.update_file(path)  # the size again: the file may have changed meanwhile
    if actual > size:
        raise InvalidRequest(f"{path} holds {actual} bytes, more than the {size} expected")
    h.zeros(size - actual)
    return h.digest()


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What ``export_disk_at`` did: the file, its size, the data bytes it had to write
    (holes are skipped) and how (``"clone"``: reflinked, no bytes copied; ``"sparse-copy"``:
    copied in the kernel; ``"copy"``: read and written)."""

    path: str
    size_bytes: int
    copied_bytes: int
    method: str


def create_export_file(path: str, size_bytes: int) -> int:
    """Open a new file for an export (it must not exist), ``size_bytes`` long, all hole."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise InvalidRequest(f"cannot export to {path}: the file already exists") from None
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidRequest(f"cannot export to {path}: its directory does not exist") from None
    try:
        os.ftruncate(fd, size_bytes)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    return fd


def _all_zero(piece: bytes | bytearray | memoryview) -> bool:
    view = memoryview(piece)
    return view == _ZEROS[: len(view)] if len(view) <= HASH_PIECE else not any(view)


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

    def prepare_writes(self, name: str, extents: list[tuple[int, int]]) -> None:
        """A hint that writes to these (offset, length) extents come next, so that a storage
        can make ready what they need several at once (local storage: the chunk versions
        they copy). Changes nothing the disk reads; by default it does nothing."""

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

    # -- recovery: digests, exports and clones of a snapshot ----------------------------
    def disk_digest(self, name: str, *, snapshot: str | None = None) -> str:
        """``"blake3:<hex>"`` of the whole raw image of the disk now, or as of ``snapshot``
        (see ``ImageHasher``). Backends override this to skip what was never written."""
        return digest_pieces(self.iter_disk(name, snapshot=snapshot, chunk_bytes=HASH_PIECE))

    def export_disk_at(self, name: str, *, snapshot: str, path: str, durable: bool = True) -> ExportResult:
        """Write the snapshot's image into a new flat file at ``path`` (which must not exist),
        sparse: ranges that were never written stay holes. With ``durable`` the file is
        fsync'd before this returns. On any error the file is removed again. Backends
        override this to copy only what the snapshot holds, in the kernel where they can."""
        size = self.disk_size(name, snapshot=snapshot)
        fd = create_export_file(path, size)
        copied = 0
        try:
            offset = 0
            for piece in self.iter_disk(name, snapshot=snapshot, chunk_bytes=4 * 1024 * 1024):
                if not _all_zero(piece):
                    write_all(fd, piece, offset)
                    copied += len(piece)
                offset += len(piece)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        os.close(fd)
        return ExportResult(path, size, copied, "copy")

    def clone_disk_at(self, name: str, *, snapshot: str, dest_name: str) -> str:
        """Make a new, independent disk ``dest_name`` holding the snapshot's bytes; later
        writes to either disk never change the other (nor any snapshot). ``DiskExists`` if
        ``dest_name`` is taken. Returns how: ``"clone"`` (shares what it can, copy-on-write),
        ``"server-copy"`` or ``"copy"`` (this generic version: read and written)."""
        check_disk_name(dest_name)
        size = self.disk_size(name, snapshot=snapshot)
        self.create_disk(dest_name, size)
        try:
            offset = 0
            for piece in self.iter_disk(name, snapshot=snapshot, chunk_bytes=4 * 1024 * 1024):
                if not _all_zero(piece):
                    self.write_disk(dest_name, offset, piece)
                offset += len(piece)
            self.flush_disk(dest_name)
        except BaseException:
            self.delete_disk(dest_name)
            raise
        return "copy"

    def close(self) -> None:
        """Release open files and connections."""

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
