"""Local-directory storage: cache objects as files, replica disks as copy-on-write chunks.

Layout under ``root``::

    objects/<key>                           one file per cache object
    disks/<name>/disk.map                   the live disk's manifest
    disks/<name>/chunks/<idx // 1024>/<idx>.<gen>
                                            one file per chunk *version*
    disks/<name>/snapshots/<id>.map         a snapshot's manifest (frozen copy of the map)
    disks/<name>/snapshots/<id>.deleting    a snapshot being deleted (finished on next open)
    disks/<name>/ALLOCATING                 present while chunk files may exist that no
                                            durable manifest mentions (crash clean-up hint)
    disks/.deleting-<name>-<token>/         a disk being deleted (finished on next open)

Objects are written to a temporary file in the same directory, fsynced, renamed over the
key's path and the directory fsynced, so a reader or a crash sees the old or the new object.
An object made from a durable file (``put_object_file``, the process server's uploads) is a
hard link to that file, renamed into place the same way: its bytes are not written twice.

**Disks and snapshots.** A disk is cut into fixed chunks of ``chunk_bytes`` (1 MiB by
default). A manifest maps each chunk index to a *generation* (0: never written, reads as
zeros); ``chunks/.../<idx>.<gen>`` holds that version's bytes, as a sparse file (only the
written ranges take space). Generations come from a per-disk counter that only grows. A
snapshot is a durable copy of the map plus ``next_gen`` at that moment: it pins exactly the
chunk versions then current and costs a few bytes per chunk of metadata, not data. The
*watermark* is the highest ``next_gen`` of any snapshot: a chunk version with a lower
generation may be pinned, so a write to it first copies the chunk (only its allocated
ranges, via SEEK_DATA/SEEK_HOLE) to a new generation and writes there (copy-on-write); a
version at or above the watermark belongs to the live disk alone and is written in place
with ``os.pwrite``. A write covering a whole chunk skips the copy. Pinned files are never
opened for writing, which is what keeps every snapshot's bytes exact whatever happens.

Because generations only grow and a chunk version, once replaced in the live map, never comes
back, the snapshots pinning one version form a contiguous run in time. Deleting snapshot S
therefore frees each of its chunk versions unless the next older surviving snapshot, or the
next newer one (the live disk if S is the newest), has the same version: exactly the chunks
no other snapshot or the live disk uses, found from two neighbours instead of all snapshots.

**Why 1 MiB chunks.** Copy-on-write costs at most one chunk of copying per chunk first
touched after a point (sparse-aware, so less for a sparsely written chunk); smaller chunks
would mean more files (1 MiB is ~1 M files per fully written TiB, 1024 per directory) and a
bigger map (8 bytes a chunk, compressed), larger ones more copying per small write. 1 MiB
also matches the apply engine's write sizes, so a chunk copy is one sequential read and
write. The size is fixed per disk when it is created (``chunk_bytes`` in the config).

**Durability and crash safety.** A write of a whole chunk into a new version of it (the
initial copy, whole-chunk rewrites) goes straight to the device with O_DIRECT from an
aligned buffer, where the file system allows it, on a background writer thread (a few per
disk under way; the caller goes on, any other access to that chunk waits for it, and
``flush_disk`` waits for all of them and fails, writing no map, if one failed); logs are
read with O_DIRECT too (``get_object_into``); other writes go to the page cache with
``os.pwrite`` (and ``sync_file_range`` starts writing them back at once, so the later fsync
has little to wait for), and fsync'd chunk files leave the page cache. ``flush_disk``
fsyncs the touched chunk files and new directory entries, then (if the map changed)
replaces ``disk.map`` by write-temp-fsync-rename. ``snapshot_disk`` flushes,
rewrites ``disk.map``, then writes the snapshot manifest the same way; the in-memory
watermark moves at once, so no later write can touch a pinned file. After a crash, the
durable ``disk.map`` is the disk as of the last flush (later writes may be lost or partly
present; the apply engine replays them, writes being absolute).
Chunk versions created after the last durable map are found through ``ALLOCATING`` (written
and fsynced before the first new chunk file after each flush) and deleted on open; a
snapshot deletion is a rename to ``.deleting`` first, then frees chunks, then removes the
manifest, and an interrupted one is finished on open.

**Clones and exports of a snapshot** (recovery). ``clone_disk_at`` makes a new disk whose
chunk versions are hard links to the snapshot's files: no data is copied. A chunk file with
more than one link is never written in place by either disk, whatever the watermark (the
snapshot that pinned it may be deleted later): the writer copies it to a new version first,
and once the map without the old version is durable it drops its link, leaving the other
disk the sole owner. ``export_disk_at`` writes a snapshot into a flat sparse file: only the
allocated ranges of its chunk versions, reflinked where the file system can, else copied
with ``copy_file_range``. ``disk_digest`` of a snapshot reads only its chunk versions, with
a few reads in flight, and hashes chunks never written as zeros without reading them.

One process writes a disk at a time (the apply engine of its item holds the item's lock);
other processes may read snapshots, and the writer may move from process to process. Every
change to the live map, and every new snapshot, rewrites ``disk.map`` with a new random
token *before* it takes effect; a handle with nothing unflushed compares tokens before each
use and reloads on a mismatch, so a long-lived handle never writes with a stale map or
watermark (a deleted snapshot only lowers the watermark, so a stale one is merely cautious;
reading a snapshot checks that its manifest still exists).

The code: ``local_map`` (the chunk map's format), ``local_disk`` (``LocalDisk``: one disk,
its chunk versions, snapshots and recovery), ``local_files`` (sparse copies, reflinks,
write-back hints) and this module (``LocalStorage``: objects, and the disks by name);
durable files are written by ``mobility.durable``.
"""
from __future__ import annotations

import array
import errno
import mmap
import os
import secrets
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Iterator

from mobility.durable import fsync_dir, makedirs_durable, replace_durably, temp_path, unlink_quietly

from ..buffers import BufferPool, Held, read_file
from .base import (
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
from .local_disk import CHUNK_FILE, SHARD, LocalDisk
from .local_files import (
    NO_REFLINK,
    allocated,
    copy_between,
    copy_file_durably,
    data_ranges,
    read_into,
    reflink_range,
    start_writeback,
    tree_allocated,
)
from .local_map import KIND_LIVE, ChunkMap

DEFAULT_CHUNK_BYTES = 1024 * 1024
_DIRECT_WRITERS = 2  # background writer threads per storage
_DIGEST_PIECE = 16 * 1024 * 1024  # bytes of a snapshot hashed at once ...
_DIGEST_DEPTH = 3  # ... while up to this many pieces are being read ...
_DIGEST_READERS = 4  # ... by this many threads
_ZEROS = memoryview(bytes(_DIGEST_PIECE))


class LocalStorage(Storage):
    """Storage in a local directory (see the module's documentation)."""

    def __init__(self, root: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes <= 0 or chunk_bytes % 4096:
            raise InvalidRequest("chunk_bytes must be a positive multiple of 4096")
        self.root = os.path.abspath(root)
        self.chunk_bytes = chunk_bytes
        self.objects_root = os.path.join(self.root, "objects")
        self.disks_root = os.path.join(self.root, "disks")
        makedirs_durable(self.objects_root)
        makedirs_durable(self.disks_root)
        self._disks: dict[str, LocalDisk] = {}
        self._lock = threading.RLock()
        self._writers: ThreadPoolExecutor | None = None
        self._writers_pid = 0
        for n in os.listdir(self.disks_root):
            if n.startswith(".deleting-"):  # a disk deletion a crash interrupted
                shutil.rmtree(os.path.join(self.disks_root, n), ignore_errors=True)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def direct_writers(self) -> ThreadPoolExecutor:
        """The threads that write whole chunks in the background (made on first use, and
        anew in a forked child, which does not inherit threads)."""
        if self._writers is None or self._writers_pid != os.getpid():
            self._writers = ThreadPoolExecutor(max_workers=_DIRECT_WRITERS, thread_name_prefix="storage-writer")
            self._writers_pid = os.getpid()
        return self._writers

    # -- objects --------------------------------------------------------------------------
    def _object_path(self, key: str) -> str:
        return os.path.join(self.objects_root, *check_key(key).split("/"))

    def _object_path_for_put(self, key: str) -> str:
        """The object's path, its directory made (durably) ready to receive it."""
        path = self._object_path(key)
        if os.path.isdir(path):
            raise InvalidRequest(f"object key {key!r} is a prefix of other keys here")
        try:
            makedirs_durable(os.path.dirname(path))
        except NotADirectoryError:
            raise InvalidRequest(f"object key {key!r} lies under an existing object") from None
        return path

    def put_object(self, key: str, data: bytes | bytearray | memoryview) -> None:
        replace_durably(self._object_path_for_put(key), data)

    def put_object_file(self, key: str, path: str) -> None:
        """A hard link to the (durable) file when it is on this file system: the object costs
        a directory entry, not a copy. Elsewhere, a kernel-side copy, fsync'd."""
        dst = self._object_path_for_put(key)
        directory = os.path.dirname(dst)
        tmp = temp_path(dst)
        try:
            os.link(path, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            copy_file_durably(path, tmp)
        try:
            os.replace(tmp, dst)
        finally:
            unlink_quietly(tmp)  # left in place when dst already was this very file
        fsync_dir(directory)

    def get_object(self, key: str) -> bytes:
        path = self._object_path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r}") from None

    def get_object_into(self, key: str, pool: BufferPool) -> Held:
        """Read with O_DIRECT into a pooled buffer: a log is read once, then deleted."""
        try:
            return read_file(self._object_path(key), pool)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r}") from None

    def list_objects(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        base = prefix.rpartition("/")[0]
        start = os.path.join(self.objects_root, *base.split("/")) if base else self.objects_root
        keys: list[str] = []

        def walk(directory: str, rel: str) -> None:
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return
            for e in entries:
                if e.name.startswith("."):
                    continue
                key = f"{rel}{e.name}"
                if e.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        walk(e.path, key + "/")
                elif key.startswith(prefix):
                    keys.append(key)

        walk(start, f"{base}/" if base else "")
        keys.sort()
        return keys

    def delete_object(self, key: str) -> None:
        path = self._object_path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            raise InvalidRequest(f"{key!r} is a prefix of other keys, not an object") from None
        fsync_dir(os.path.dirname(path))

    # -- disks ----------------------------------------------------------------------------
    def _disk_path(self, name: str) -> str:
        return os.path.join(self.disks_root, check_disk_name(name))

    def _disk(self, name: str, *, for_write: bool = False) -> LocalDisk:
        """The disk's handle, current; ``for_write`` for anything that changes the disk."""
        d = self._disks.get(name)
        if d is None:
            d = LocalDisk(self, name, self._disk_path(name))
            self._disks[name] = d
        try:
            d.refresh(for_write=for_write)
        except DiskNotFound:
            self._disks.pop(name, None)
            raise
        return d

    def disk_exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self._disk_path(name), "disk.map"))

    def create_disk(self, name: str, size_bytes: int) -> None:
        check_disk_size(size_bytes)
        path = self._disk_path(name)
        with self._lock:
            if os.path.exists(os.path.join(path, "disk.map")):
                raise DiskExists(f"disk {name!r} already exists")
            if os.path.isdir(path):  # the remains of a creation a crash interrupted
                shutil.rmtree(path)
            makedirs_durable(os.path.join(path, "chunks"))
            makedirs_durable(os.path.join(path, "snapshots"))
            count = -(-size_bytes // self.chunk_bytes)
            m = ChunkMap(self.chunk_bytes, size_bytes, 1, time.time_ns(), array.array("Q", bytes(8 * count)),
                     int.from_bytes(os.urandom(8), "little"))
            replace_durably(os.path.join(path, "disk.map"), m.encode(KIND_LIVE))
            self._disks.pop(name, None)

    def disk_size(self, name: str, *, snapshot: str | None = None) -> int:
        with self._lock:
            d = self._disk(name)
            return d.snapshot_map(snapshot).size if snapshot is not None else d.map.size

    def resize_disk(self, name: str, size_bytes: int) -> None:
        check_disk_size(size_bytes)
        with self._lock:
            self._disk(name, for_write=True).resize(size_bytes)

    def write_disk(self, name: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        with self._lock:
            d = self._disk(name, for_write=True)
            check_write(name, offset, len(view), d.map.size)
            if view:
                d.write(offset, view)

    def prepare_writes(self, name: str, extents: list[tuple[int, int]]) -> None:
        with self._lock:
            self._disk(name, for_write=True).prepare(extents)

    def flush_disk(self, name: str) -> None:
        with self._lock:
            self._disk(name, for_write=True).flush()

    def read_disk(self, name: str, offset: int, length: int, *, snapshot: str | None = None) -> bytes:
        with self._lock:
            d = self._disk(name)
            m = d.snapshot_map(snapshot) if snapshot is not None else d.map
            check_read(name if snapshot is None else f"{name}@{snapshot}", offset, length, m.size)
            if not length:
                return b""
            return d.read(m, offset, length, live=snapshot is None)

    def delete_disk(self, name: str) -> None:
        path = self._disk_path(name)
        with self._lock:
            d = self._disks.pop(name, None)
            if d is not None:
                d.close_fds()
            if not os.path.isdir(path):
                return
            doomed = os.path.join(self.disks_root, f".deleting-{name}-{secrets.token_hex(4)}")
            os.rename(path, doomed)
            fsync_dir(self.disks_root)
            shutil.rmtree(doomed, ignore_errors=True)

    # -- snapshots ------------------------------------------------------------------------
    def snapshot_disk(self, name: str) -> str:
        with self._lock:
            return self._disk(name, for_write=True).snapshot()

    def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        with self._lock:
            try:
                d = self._disk(name, for_write=True)
            except DiskNotFound:
                return
            d.delete_snapshot(snapshot_id)

    def list_snapshots(self, name: str) -> list[str]:
        with self._lock:
            return self._disk(name).snapshot_ids()

    # -- accounting -----------------------------------------------------------------------
    def used_bytes(self, prefix: str = "") -> int:
        check_prefix(prefix)
        total = 0
        with self._lock:
            for key in self.list_objects(prefix):
                try:
                    total += allocated(os.stat(self._object_path(key)))
                except FileNotFoundError:
                    pass
            for n in sorted(os.listdir(self.disks_root)):
                if n.startswith(".") or not n.startswith(prefix):
                    continue
                total += tree_allocated(os.path.join(self.disks_root, n))
        return total

    # -- recovery: digests, exports and clones of a snapshot ----------------------------
    # A snapshot's chunk versions never change while it exists, so these read them without
    # holding the storage's lock; a file that disappears means the snapshot was deleted.

    def _pinned(self, name: str, snapshot: str) -> tuple[LocalDisk, ChunkMap]:
        with self._lock:
            d = self._disk(name)
            return d, d.snapshot_map(snapshot)

    def _open_pinned(self, d: LocalDisk, snapshot: str, idx: int, gen: int) -> int:
        try:
            return os.open(d.chunk_path(idx, gen), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._gone(d, snapshot, idx, gen)
            raise  # not reached

    def _gone(self, d: LocalDisk, snapshot: str, idx: int, gen: int) -> None:
        if not os.path.exists(d._snap_path(snapshot)):
            raise SnapshotNotFound(f"disk {d.name!r} has no snapshot {snapshot!r} (deleted meanwhile)") from None
        raise StorageError(f"disk {d.name!r}: chunk {idx} version {gen} is missing from {d.chunks_dir}") from None

    def disk_digest(self, name: str, *, snapshot: str | None = None) -> str:
        """The image digest; of a snapshot, reading only the chunk versions it holds (a
        chunk never written is hashed as zeros, unread). Chunk files are read by a few
        threads at once (a device answers several reads faster than one after the other)
        into a ring of page-aligned buffers, each hashed on all cores while the next ones
        are read."""
        if snapshot is None:
            with self._lock:
                return super().disk_digest(name)
        d, m = self._pinned(name, snapshot)
        cb = m.chunk_bytes
        per_piece = max(1, _DIGEST_PIECE // cb)
        count = len(m.gens)
        groups = [range(i, min(i + per_piece, count)) for i in range(0, count, per_piece)]
        ring = [mmap.mmap(-1, per_piece * cb) for _ in range(min(_DIGEST_DEPTH, len(groups)))]
        views = [memoryview(buf) for buf in ring]

        def read_chunk(view: memoryview, idx: int, gen: int) -> None:
            fd = self._open_pinned(d, snapshot, idx, gen)
            try:
                got = read_into(fd, view)
            finally:
                os.close(fd)
            if got < len(view):  # past the end of a sparse or shortened chunk file
                view[got:] = bytes(len(view) - got)

        hasher = ImageHasher()
        try:
            with ThreadPoolExecutor(max_workers=_DIGEST_READERS, thread_name_prefix="digest-reader") as readers:

                def submit(n: int) -> list[Future]:
                    view = views[n % len(views)]
                    futures = []
                    pos = 0
                    for idx in groups[n]:
                        extent = m.extent(idx)
                        gen = m.gens[idx]
                        if gen:
                            futures.append(readers.submit(read_chunk, view[pos : pos + extent], idx, gen))
                        else:
                            view[pos : pos + extent] = _ZEROS[:extent]
                        pos += extent
                    return futures

                pending = {n: submit(n) for n in range(len(ring))}
                try:
                    for n, group in enumerate(groups):
                        futures = pending.pop(n)
                        length = sum(m.extent(idx) for idx in group)
                        if futures:
                            for f in futures:
                                f.result()
                            hasher.update(views[n % len(views)][:length])
                        else:
                            hasher.zeros(length)  # nothing written there: not even copied
                        if n + len(ring) < len(groups):
                            pending[n + len(ring)] = submit(n + len(ring))
                finally:
                    for futures in pending.values():
                        for f in futures:
                            f.cancel()
                    wait([f for futures in pending.values() for f in futures])
        finally:
            for view in views:
                view.release()
            for buf in ring:
                buf.close()
        if hasher.length != m.size:
            raise StorageError(f"disk {name!r}@{snapshot}: hashed {hasher.length} of {m.size} bytes")
        return hasher.digest()

    def export_disk_at(self, name: str, *, snapshot: str, path: str, durable: bool = True) -> ExportResult:
        """Only the allocated ranges of the snapshot's chunk versions are written, each
        shared with the file (reflink) where the file system allows it, else copied in the
        kernel (``copy_file_range``); chunks never written stay holes."""
        d, m = self._pinned(name, snapshot)
        cb = m.chunk_bytes
        fd = create_export_file(path, m.size)
        copied = cloned = 0
        reflink = True
        try:
            for idx, gen in enumerate(m.gens):
                if not gen:
                    continue
                src = self._open_pinned(d, snapshot, idx, gen)
                try:
                    for start, end in data_ranges(src, m.extent(idx)):
                        at = idx * cb + start
                        if reflink:
                            try:
                                reflink_range(src, fd, start, at, end - start)
                                cloned += end - start
                                continue
                            except OSError as e:
                                if e.errno in NO_REFLINK:
                                    reflink = False  # this file system cannot: copy from now on
                                elif e.errno != errno.EINVAL:  # EINVAL: this range is not aligned
                                    raise
                        copy_between(src, fd, start, at, end - start)
                        start_writeback(fd, at, end - start)
                        copied += end - start
                finally:
                    os.close(src)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        os.close(fd)
        if durable:
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        return ExportResult(path, m.size, copied, "clone" if cloned and not copied else "sparse-copy")

    def clone_disk_at(self, name: str, *, snapshot: str, dest_name: str) -> str:
        """A new disk whose chunk versions are hard links to the snapshot's: no data is
        copied. Both disks then copy a shared version before writing to it (a file with
        more than one link is never written in place), so neither disk, nor any
        snapshot, ever sees the other's writes."""
        check_disk_name(dest_name)
        dest = self._disk_path(dest_name)
        with self._lock:
            d, m = self._pinned(name, snapshot)
            if os.path.exists(os.path.join(dest, "disk.map")):
                raise DiskExists(f"disk {dest_name!r} already exists")
            if os.path.isdir(dest):  # the remains of a creation a crash interrupted
                shutil.rmtree(dest)
            makedirs_durable(os.path.join(dest, "chunks"))
            makedirs_durable(os.path.join(dest, "snapshots"))
        try:
            shards: set[str] = set()
            for idx, gen in enumerate(m.gens):
                if not gen:
                    continue
                shard = os.path.join(dest, "chunks", str(idx // SHARD))
                if shard not in shards:
                    os.makedirs(shard, exist_ok=True)
                    shards.add(shard)
                try:
                    os.link(d.chunk_path(idx, gen), os.path.join(shard, f"{idx}.{gen}"))
                except FileNotFoundError:
                    self._gone(d, snapshot, idx, gen)
            for shard in shards:
                fsync_dir(shard)
            fsync_dir(os.path.join(dest, "chunks"))
            # The snapshot still existing now means it pinned every linked version from the
            # moment its map was read (a deleted snapshot never comes back): the links hold
            # exactly its bytes.
            if not os.path.exists(d._snap_path(snapshot)):
                raise SnapshotNotFound(f"disk {name!r} has no snapshot {snapshot!r} (deleted meanwhile)")
            clone = ChunkMap(m.chunk_bytes, m.size, m.next_gen, time.time_ns(), array.array("Q", m.gens),
                         int.from_bytes(os.urandom(8), "little"))
            replace_durably(os.path.join(dest, "disk.map"), clone.encode(KIND_LIVE))
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        with self._lock:
            self._disks.pop(dest_name, None)
        return "clone"

    def chunk_files(self, name: str) -> Iterator[str]:
        """Paths of every chunk version file of a disk (for tests and diagnostics)."""
        base = os.path.join(self._disk_path(name), "chunks")
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if CHUNK_FILE.match(f):
                    yield os.path.join(dirpath, f)

    def close(self) -> None:
        with self._lock:
            for d in self._disks.values():
                d.close_fds()
            self._disks.clear()
            if self._writers is not None and self._writers_pid == os.getpid():
                self._writers.shutdown(wait=True)
            self._writers = None
