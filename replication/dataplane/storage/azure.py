"""Azure Blob Storage: one container holds cache objects and replica disks.

* cache objects are block blobs named ``objects/<key>``; an upload replaces the blob in one
  operation, so readers see the old object or the new one;
* replica disks are page blobs named ``disks/<name>``; a write is split into page writes of
  at most 4 MiB (the service's limit), each durable when the call returns, so
  ``flush_disk`` has nothing left to do;
* snapshots are blob snapshots: read-only, incremental on the service side (they hold only
  the pages changed after them), deleted individually or with their disk.

``used_bytes`` estimates what the account bills: object sizes, each disk's valid page ranges,
and for each snapshot the page ranges that changed after it (a page range diff against the
next newer snapshot or the disk). An emulator that answers the diff with all pages (Azurite
does) makes this an upper bound.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient

from mobility.durable import write_all

from .base import (
    MAX_PAGE_WRITE,
    DiskExists,
    DiskNotFound,
    ExportResult,
    ImageHasher,
    InvalidRequest,
    ObjectNotFound,
    SnapshotNotFound,
    Storage,
    StorageError,
    check_disk_name,
    check_disk_size,
    check_key,
    check_prefix,
    check_read,
    check_write,
    create_export_file,
)

OBJECTS = "objects/"
DISKS = "disks/"
COPY_TIMEOUT_S = 3600.0  # a server-side copy of a disk that has not finished by then failed
_DOWNLOAD_PIECE = 32 * 1024 * 1024

T = TypeVar("T")


def _wrapped(op: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Turn unexpected service and transport errors into ``StorageError`` naming the call."""

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(self: "AzureStorage", *args: Any, **kwargs: Any) -> T:
            try:
                return fn(self, *args, **kwargs)
            except StorageError:
                raise
            except AzureError as e:
                detail = getattr(e, "error_code", None) or type(e).__name__
                msg = str(e).splitlines()[0] if str(e) else ""
                raise StorageError(
                    f"azure {op} on container {self.container_name!r} failed ({detail}): {msg}"
                ) from e

        return inner

    return deco


class AzureStorage(Storage):
    def __init__(self, connection_string: str, container: str):
        self.container_name = container
        self.connection_string = connection_string  # kept for handing to a subprocess; never logged
        try:
            self._service = BlobServiceClient.from_connection_string(connection_string)
        except ValueError as e:
            raise InvalidRequest(f"azure connection string is not valid: {e}") from None
        self._container: ContainerClient = self._service.get_container_client(container)
        self._sizes: dict[str, int] = {}
        self._ensure_container()

    def __repr__(self) -> str:
        return f"AzureStorage(container={self.container_name!r})"

    @_wrapped("create container")
    def _ensure_container(self) -> None:
        try:
            self._container.create_container()
        except ResourceExistsError:
            pass

    def _blob(self, blob_name: str, snapshot: str | None = None) -> BlobClient:
        return self._container.get_blob_client(blob_name, snapshot=snapshot)

    # -- objects --------------------------------------------------------------------------
    @_wrapped("put object")
    def put_object(self, key: str, data: bytes | bytearray | memoryview) -> None:
        check_key(key)
        self._container.upload_blob(OBJECTS + key, bytes(data), overwrite=True, blob_type="BlockBlob")

    @_wrapped("get object")
    def get_object(self, key: str) -> bytes:
        check_key(key)
        try:
            return self._blob(OBJECTS + key).download_blob().readall()
        except ResourceNotFoundError:
            raise ObjectNotFound(f"no object {key!r}") from None

    @_wrapped("list objects")
    def list_objects(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        n = len(OBJECTS)
        return sorted(name[n:] for name in self._container.list_blob_names(name_starts_with=OBJECTS + prefix))

    @_wrapped("delete object")
    def delete_object(self, key: str) -> None:
        check_key(key)
        try:
            self._blob(OBJECTS + key).delete_blob()
        except ResourceNotFoundError:
            pass

    # -- disks ----------------------------------------------------------------------------
    def _disk_blob(self, name: str, snapshot: str | None = None) -> BlobClient:
        return self._blob(DISKS + check_disk_name(name), snapshot)

    def _not_found(self, name: str, snapshot: str | None) -> Exception:
        if snapshot is not None and self.disk_exists(name):
            return SnapshotNotFound(f"disk {name!r} has no snapshot {snapshot!r}")
        return DiskNotFound(f"disk {name!r} does not exist")

    @_wrapped("check disk")
    def disk_exists(self, name: str) -> bool:
        return self._disk_blob(name).exists()

    @_wrapped("create disk")
    def create_disk(self, name: str, size_bytes: int) -> None:
        check_disk_size(size_bytes)
        try:
            self._disk_blob(name).create_page_blob(size_bytes, if_none_match="*")
        except ResourceExistsError:
            raise DiskExists(f"disk {name!r} already exists") from None
        self._sizes[name] = size_bytes

    @_wrapped("get disk size")
    def disk_size(self, name: str, *, snapshot: str | None = None) -> int:
        try:
            size = self._disk_blob(name, snapshot).get_blob_properties().size
        except (ResourceNotFoundError, HttpResponseError) as e:
            if isinstance(e, ResourceNotFoundError) or snapshot is not None:
                raise self._not_found(name, snapshot) from None
            raise
        if snapshot is None:
            self._sizes[name] = size
        return size

    @_wrapped("resize disk")
    def resize_disk(self, name: str, size_bytes: int) -> None:
        check_disk_size(size_bytes)
        try:
            self._disk_blob(name).resize_blob(size_bytes)
        except ResourceNotFoundError:
            raise DiskNotFound(f"disk {name!r} does not exist") from None
        self._sizes[name] = size_bytes

    @_wrapped("write disk")
    def write_disk(self, name: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = self._sizes.get(name)
        if size is None or offset + len(view) > size:  # unknown, or resized by another process
            size = self.disk_size(name)
        check_write(name, offset, len(view), size)
        blob = self._disk_blob(name)
        pos = 0
        try:
            while pos < len(view):
                take = min(MAX_PAGE_WRITE, len(view) - pos)
                blob.upload_page(view[pos : pos + take], offset=offset + pos, length=take)
                pos += take
        except ResourceNotFoundError:
            self._sizes.pop(name, None)
            raise DiskNotFound(f"disk {name!r} does not exist") from None

    def flush_disk(self, name: str) -> None:
        check_disk_name(name)  # every page write is durable when it returns

    @_wrapped("read disk")
    def read_disk(self, name: str, offset: int, length: int, *, snapshot: str | None = None) -> bytes:
        where = name if snapshot is None else f"{name}@{snapshot}"
        if offset < 0 or length < 0:
            check_read(where, offset, length, 0)
        if length == 0:
            self.disk_size(name, snapshot=snapshot)  # still report a missing disk or snapshot
            return b""
        try:
            data = self._disk_blob(name, snapshot).download_blob(offset=offset, length=length).readall()
        except ResourceNotFoundError:
            raise self._not_found(name, snapshot) from None
        except HttpResponseError as e:
            if e.status_code == 416:
                check_read(where, offset, length, self.disk_size(name, snapshot=snapshot))
            if snapshot is not None and e.status_code == 400:
                raise self._not_found(name, snapshot) from None
            raise
        if len(data) != length:
            check_read(where, offset, length, self.disk_size(name, snapshot=snapshot))
            raise StorageError(f"read of disk {where!r} at {offset}+{length} returned {len(data)} bytes")
        return data

    @_wrapped("delete disk")
    def delete_disk(self, name: str) -> None:
        self._sizes.pop(name, None)
        try:
            self._disk_blob(name).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            pass

    # -- snapshots ------------------------------------------------------------------------
    @_wrapped("snapshot disk")
    def snapshot_disk(self, name: str) -> str:
        try:
            return self._disk_blob(name).create_snapshot()["snapshot"]
        except ResourceNotFoundError:
            raise DiskNotFound(f"disk {name!r} does not exist") from None

    @_wrapped("delete snapshot")
    def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        if not snapshot_id:
            raise InvalidRequest("snapshot id must not be empty")
        try:
            self._disk_blob(name, snapshot_id).delete_blob()
        except ResourceNotFoundError:
            pass

    @_wrapped("list snapshots")
    def list_snapshots(self, name: str) -> list[str]:
        blob_name = DISKS + check_disk_name(name)
        snaps: list[str] = []
        found = False
        for b in self._container.list_blobs(name_starts_with=blob_name, include=["snapshots"]):
            if b.name != blob_name:
                continue
            if b.snapshot:
                snaps.append(b.snapshot)
            else:
                found = True
        if not found:
            raise DiskNotFound(f"disk {name!r} does not exist")
        return sorted(snaps)

    # -- accounting -----------------------------------------------------------------------
    @_wrapped("measure usage")
    def used_bytes(self, prefix: str = "") -> int:
        check_prefix(prefix)
        total = sum(b.size for b in self._container.list_blobs(name_starts_with=OBJECTS + prefix))
        versions: dict[str, list[str | None]] = {}
        for b in self._container.list_blobs(name_starts_with=DISKS + prefix, include=["snapshots"]):
            versions.setdefault(b.name, []).append(b.snapshot)
        for blob_name, snaps in versions.items():
            ordered = sorted(s for s in snaps if s)
            if None in snaps:
                total += _ranges_bytes(self._blob(blob_name).list_page_ranges())
            for i, snap in enumerate(ordered):
                newer = ordered[i + 1] if i + 1 < len(ordered) else None
                if newer is None and None not in snaps:
                    total += _ranges_bytes(self._blob(blob_name, snap).list_page_ranges())
                else:
                    diff = self._blob(blob_name, newer).list_page_ranges(previous_snapshot=snap)
                    total += _ranges_bytes(diff, include_cleared=True)
        return total

    # -- recovery: digests, exports and clones of a snapshot ----------------------------
    def _valid_ranges(self, name: str, snapshot: str | None) -> tuple[int, list[tuple[int, int]]]:
        """The disk's size and its written page ranges, (start, end) end exclusive, merged."""
        size = self.disk_size(name, snapshot=snapshot)
        try:
            ranges = sorted(
                (r.start, r.end + 1) for r in self._disk_blob(name, snapshot).list_page_ranges()
                if not getattr(r, "cleared", False)
            )
        except ResourceNotFoundError:
            raise self._not_found(name, snapshot) from None
        merged: list[tuple[int, int]] = []
        for start, end in ranges:
            end = min(end, size)
            if start >= end:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return size, merged

    def _download(self, name: str, snapshot: str | None, start: int, end: int):
        """The bytes of [start, end) in pieces of at most 32 MiB, each fetched in parallel parts."""
        blob = self._disk_blob(name, snapshot)
        pos = start
        while pos < end:
            take = min(_DOWNLOAD_PIECE, end - pos)
            try:
                data = blob.download_blob(offset=pos, length=take, max_concurrency=4).readall()
            except ResourceNotFoundError:
                raise self._not_found(name, snapshot) from None
            if len(data) != take:
                raise StorageError(f"read of disk {name!r} at {pos}+{take} returned {len(data)} bytes")
            yield data
            pos += take

    @_wrapped("digest disk")
    def disk_digest(self, name: str, *, snapshot: str | None = None) -> str:
        """The image digest, downloading only the written page ranges (the rest is hashed
        as zeros, unread)."""
        size, ranges = self._valid_ranges(name, snapshot)
        hasher = ImageHasher()
        pos = 0
        for start, end in ranges:
            hasher.zeros(start - pos)
            for data in self._download(name, snapshot, start, end):
                hasher.update(data)
            pos = end
        hasher.zeros(size - pos)
        return hasher.digest()

    @_wrapped("export disk")
    def export_disk_at(self, name: str, *, snapshot: str, path: str, durable: bool = True) -> ExportResult:
        """Downloads only the written page ranges into a sparse file."""
        size, ranges = self._valid_ranges(name, snapshot)
        fd = create_export_file(path, size)
        copied = 0
        try:
            for start, end in ranges:
                pos = start
                for data in self._download(name, snapshot, start, end):
                    write_all(fd, data, pos)
                    pos += len(data)
                copied += end - start
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise
        os.close(fd)
        return ExportResult(path, size, copied, "copy")

    @_wrapped("clone disk")
    def clone_disk_at(self, name: str, *, snapshot: str, dest_name: str) -> str:
        """A server-side copy of the blob snapshot into a new, standalone page blob (as Azure
        Site Recovery makes a managed disk from a recovery point): no byte passes through
        this process. The new blob has no snapshots and no tie to the replica."""
        check_disk_name(dest_name)
        if not snapshot:
            raise InvalidRequest("snapshot id must not be empty")
        self.disk_size(name, snapshot=snapshot)  # DiskNotFound / SnapshotNotFound first
        dest = self._disk_blob(dest_name)
        if dest.exists():
            raise DiskExists(f"disk {dest_name!r} already exists")
        source_url = self._disk_blob(name, snapshot).url
        try:
            dest.start_copy_from_url(source_url, match_condition=MatchConditions.IfMissing)
        except ResourceExistsError:
            raise DiskExists(f"disk {dest_name!r} already exists") from None
        except ResourceNotFoundError:
            raise self._not_found(name, snapshot) from None
        deadline = time.monotonic() + COPY_TIMEOUT_S
        pause = 0.05
        while True:
            copy = dest.get_blob_properties().copy
            if copy.status == "success":
                break
            if copy.status in ("failed", "aborted") or time.monotonic() > deadline:
                reason = copy.status_description or copy.status or "no progress"
                self.delete_disk(dest_name)
                raise StorageError(
                    f"server-side copy of disk {name!r}@{snapshot} to {dest_name!r} failed: {reason}"
                )
            time.sleep(pause)  # the service copies on its own; nothing to do but ask again
            pause = min(pause * 2, 2.0)
        return "server-copy"

    def close(self) -> None:
        self._service.close()


def _ranges_bytes(ranges: Any, include_cleared: bool = False) -> int:
    total = 0
    for r in ranges:
        cleared = getattr(r, "cleared", False)
        if cleared and not include_cleared:
            continue
        total += r.end - r.start + 1
    return total
