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
"""
from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import re
import secrets
import shutil
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Iterator

from ..buffers import BufferPool, Held, read_file
from ..buffers import write_all as _write_all
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

DEFAULT_CHUNK_BYTES = 1024 * 1024
SHARD = 1024  # chunk files per directory
MAP_MAGIC = b"LBDM"
MAP_VERSION = 1
# magic | version u8 | kind u8 (0 live, 1 snapshot) | reserved u16 | chunk_bytes u32
# | size u64 | next_gen u64 | created_ns u64 | token u64 | chunk count u32 | body length u32
# followed by the zlib-compressed generations (u64 each) and a crc32 of everything before.
MAP_HEADER = struct.Struct("<4sBBHIQQQQII")
KIND_LIVE = 0
KIND_SNAPSHOT = 1
_SNAP_ID = re.compile(r"^[0-9]{20}$")
_CHUNK_FILE = re.compile(r"^([0-9]+)\.([0-9]+)$")
_MAX_OPEN = 256
_DIRECT_DEPTH = 4  # whole-chunk direct writes under way at once, per disk
_DIRECT_WRITERS = 2  # background writer threads per storage
_DIGEST_PIECE = 16 * 1024 * 1024  # bytes of a snapshot hashed at once ...
_DIGEST_DEPTH = 3  # ... while up to this many pieces are being read ...
_DIGEST_READERS = 4  # ... by this many threads
_ZEROS = memoryview(bytes(_DIGEST_PIECE))


def _load_sync_file_range():
    """Linux's sync_file_range(2), to start writing a chunk back while the apply engine
    decodes the next batch, so that the fsync at flush time has little left to wait for."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range, do not wait


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a hint: errors are harmless


def _fsync_all(fds: list[int]) -> None:
    # Serially: fsyncing in parallel threads measured no faster here (the device is the
    # limit), and _start_writeback already moved most of the waiting out of this call.
    for fd in fds:
        os.fsync(fd)
        # Replica data is written once and read rarely (a failover, an export): once it is
        # durable its pages leave the page cache, so the next writes reuse that memory
        # instead of growing the cache over pages other work needs.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str) -> None:
    """Create ``path`` and any missing parents, fsyncing each new entry's parent."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _makedirs_durable(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise StorageError(f"{path} exists and is not a directory") from None
        return
    _fsync_dir(parent)


def _create_durably(path: str, fill) -> None:
    """Create ``path`` (it must not exist yet), let ``fill(fd)`` write it and fsync it; on any
    error the file is removed again."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(path)
        raise
    os.close(fd)


def _atomic_write(path: str, data: bytes | bytearray | memoryview) -> None:
    """Write-temp-fsync-rename-fsync(dir): ``path`` holds the old bytes or the new ones."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{base}-{secrets.token_hex(6)}")
    _create_durably(tmp, lambda fd: _write_all(fd, memoryview(data).cast("B")))
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(directory)


def _copy_file_durably(src_path: str, dst_path: str) -> None:
    """Copy a file to a new path in the kernel (copy_file_range), fsync'd."""
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        _create_durably(dst_path, lambda fd: _copy_range(src.fileno(), fd, 0, size))


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _allocated(st: os.stat_result) -> int:
    return st.st_blocks * 512


# ----------------------------------------------------------------------------------------
# manifests


class _Map:
    """A disk's chunk map: size, chunk size, generation per chunk, next generation."""

    __slots__ = ("chunk_bytes", "size", "next_gen", "created_ns", "token", "gens")

    def __init__(
        self, chunk_bytes: int, size: int, next_gen: int, created_ns: int, gens: array.array, token: int = 0
    ):
        self.chunk_bytes = chunk_bytes
        self.size = size
        self.next_gen = next_gen
        self.created_ns = created_ns
        self.token = token  # random, new on every write of a live manifest (see refresh)
        self.gens = gens

    def encode(self, kind: int) -> bytes:
        raw = self.gens if sys.byteorder == "little" else _swapped(self.gens)
        body = zlib.compress(raw.tobytes(), 1)
        head = MAP_HEADER.pack(
            MAP_MAGIC, MAP_VERSION, kind, 0, self.chunk_bytes, self.size, self.next_gen,
            self.created_ns, self.token, len(self.gens), len(body),
        )
        return head + body + struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))

    @classmethod
    def decode(cls, buf: bytes, path: str) -> "_Map":
        if len(buf) < MAP_HEADER.size + 4:
            raise StorageError(f"disk manifest {path} is truncated")
        magic, version, _kind, _r, chunk_bytes, size, next_gen, created_ns, token, count, body_len = (
            MAP_HEADER.unpack_from(buf, 0)
        )
        if magic != MAP_MAGIC or version != MAP_VERSION:
            raise StorageError(f"{path} is not a Lifeboat disk manifest")
        end = MAP_HEADER.size + body_len
        if len(buf) != end + 4:
            raise StorageError(f"disk manifest {path} has the wrong length")
        (crc,) = struct.unpack_from("<I", buf, end)
        if crc != zlib.crc32(buf[MAP_HEADER.size:end], zlib.crc32(buf[: MAP_HEADER.size])):
            raise StorageError(f"disk manifest {path} fails its checksum")
        gens = array.array("Q")
        gens.frombytes(zlib.decompress(buf[MAP_HEADER.size:end]))
        if sys.byteorder != "little":
            gens.byteswap()
        if len(gens) != count or count != -(-size // chunk_bytes):
            raise StorageError(f"disk manifest {path} has an inconsistent chunk count")
        return cls(chunk_bytes, size, next_gen, created_ns, gens, token)

    @classmethod
    def read(cls, path: str) -> "_Map":
        with open(path, "rb") as f:
            return cls.decode(f.read(), path)

    @staticmethod
    def read_header(path: str) -> tuple[int, int]:
        """(next_gen, token) without reading the map."""
        with open(path, "rb") as f:
            head = f.read(MAP_HEADER.size)
        if len(head) < MAP_HEADER.size or head[:4] != MAP_MAGIC:
            raise StorageError(f"{path} is not a Lifeboat disk manifest")
        fields = MAP_HEADER.unpack(head)
        return fields[6], fields[8]

    def extent(self, idx: int) -> int:
        """Bytes of chunk ``idx`` inside the disk."""
        return min(self.chunk_bytes, self.size - idx * self.chunk_bytes)


def _swapped(a: array.array) -> array.array:
    b = array.array(a.typecode, a)
    b.byteswap()
    return b


# ----------------------------------------------------------------------------------------
# one disk


class _Disk:
    def __init__(self, storage: "LocalStorage", name: str, path: str):
        self.storage = storage
        self.name = name
        self.path = path
        self.map_path = os.path.join(path, "disk.map")
        self.chunks_dir = os.path.join(path, "chunks")
        self.snaps_dir = os.path.join(path, "snapshots")
        self.marker = os.path.join(path, "ALLOCATING")
        self.fds: dict[int, int] = {}  # chunk index -> fd of its current (live) version
        self.dirty_chunks: set[int] = set()
        self.dirty_dirs: set[str] = set()
        self.map_dirty = False
        self.allocating = False
        self.snap_maps: dict[str, _Map] = {}
        # Whole new chunks are written with O_DIRECT by the storage's background writers,
        # from page-aligned buffers (at most _DIRECT_DEPTH, made on first use), until the
        # file system refuses direct I/O (direct_ok turns False).
        self.direct_ok = hasattr(os, "O_DIRECT")
        self.direct_bufs: list[mmap.mmap] = []
        self.direct_free: list[mmap.mmap] = []
        self.inflight: dict[int, Future] = {}  # chunk index -> its direct write under way
        self.write_error: BaseException | None = None  # of a background write, for flush
        # Chunk versions the live map stopped using that no snapshot pins (a shared version
        # copied away, see _owns_version): unlinked once the map without them is durable.
        self.released: list[str] = []
        self.load()

    # -- loading and recovery -------------------------------------------------------------
    def load(self) -> None:
        """Read the durable state. Changes nothing on disk: readers in other processes may
        run while the disk's writer works, so clean-up is left to ``recover``."""
        self.close_fds()
        try:
            self.map = _Map.read(self.map_path)
        except FileNotFoundError:
            raise DiskNotFound(f"disk {self.name!r} does not exist") from None
        self.snap_maps.clear()
        self.allocating = False  # whether *this* handle wrote the marker
        self.dirty_chunks.clear()
        self.dirty_dirs.clear()
        self.map_dirty = False
        self.released = []
        self.snap_next_gen: dict[str, int] = {}
        self.last_snap_id = 0
        for sid, deleting in self._snapshot_files():
            try:
                next_gen, _token = _Map.read_header(self._snap_path(sid, deleting))
            except FileNotFoundError:  # deleted meanwhile by the writer (we are a reader)
                continue
            self.snap_next_gen[sid] = next_gen
            self.map.next_gen = max(self.map.next_gen, next_gen)
            self.last_snap_id = max(self.last_snap_id, int(sid))
        self.watermark = max(self.snap_next_gen.values(), default=0)
        self.recovered = False

    def recover(self) -> None:
        """Finish what a writer that died left behind: a snapshot deletion, chunk versions no
        durable manifest mentions. Only the disk's one writer may run this, before writing."""
        for sid, deleting in self._snapshot_files():
            if deleting:
                self._finish_snapshot_delete(sid)
        if os.path.exists(self.marker):
            self._collect_orphans()
        self.allocating = False
        self.recovered = True

    def _snapshot_files(self) -> list[tuple[str, bool]]:
        out = []
        try:
            names = os.listdir(self.snaps_dir)
        except FileNotFoundError:
            return out
        for n in names:
            sid, _, ext = n.partition(".")
            if _SNAP_ID.match(sid) and ext in ("map", "deleting"):
                out.append((sid, ext == "deleting"))
        out.sort()
        return out

    def _snap_path(self, sid: str, deleting: bool = False) -> str:
        return os.path.join(self.snaps_dir, f"{sid}.{'deleting' if deleting else 'map'}")

    def _collect_orphans(self) -> None:
        """Delete chunk files neither the durable live map nor any snapshot refers to (left
        by a crash between creating them and the next durable manifest)."""
        referenced: set[tuple[int, int]] = {(i, g) for i, g in enumerate(self.map.gens) if g}
        highest = self.map.next_gen - 1
        for sid in self.snapshot_ids():
            m = self.snapshot_map(sid)
            referenced.update((i, g) for i, g in enumerate(m.gens) if g)
        touched = set()
        for shard in self._listdir(self.chunks_dir):
            shard_dir = os.path.join(self.chunks_dir, shard)
            for fname in self._listdir(shard_dir):
                m = _CHUNK_FILE.match(fname)
                if not m:
                    if fname.startswith(".tmp-"):
                        _unlink_quiet(os.path.join(shard_dir, fname))
                    continue
                idx, gen = int(m.group(1)), int(m.group(2))
                highest = max(highest, gen)
                if (idx, gen) not in referenced:
                    _unlink_quiet(os.path.join(shard_dir, fname))
                    touched.add(shard_dir)
        for d in touched:
            _fsync_dir(d)
        self.map.next_gen = max(self.map.next_gen, highest + 1)
        _unlink_quiet(self.marker)
        self.allocating = False

    @staticmethod
    def _listdir(path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def refresh(self, *, for_write: bool) -> None:
        """Reload what another process changed since this handle loaded, unless this handle
        has unflushed writes (then it is the disk's one writer and up to date).

        Every change to the live map, and every new snapshot, first rewrites ``disk.map``
        with a new random token, so a token equal to ours means our map and watermark are
        current. Before writing, the writer also finishes what a dead writer left: an
        ``ALLOCATING`` marker it did not write itself means orphans to collect."""
        if self.dirty_chunks or self.map_dirty:
            return
        try:
            _next_gen, token = _Map.read_header(self.map_path)
        except FileNotFoundError:
            self.close_fds()
            raise DiskNotFound(f"disk {self.name!r} does not exist") from None
        if token != self.map.token:
            self.load()
        if for_write and (not self.recovered or (not self.allocating and os.path.exists(self.marker))):
            self.recover()

    # -- chunk files ----------------------------------------------------------------------
    def chunk_path(self, idx: int, gen: int) -> str:
        return os.path.join(self.chunks_dir, str(idx // SHARD), f"{idx}.{gen}")

    def close_fds(self) -> None:
        # Writes under way finish first; a failed one is dropped with the unflushed state
        # it belonged to (the durable map never referred to it).
        self.settle(raise_error=False)
        self.write_error = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _live_fd(self, idx: int) -> int:
        fd = self.fds.get(idx)
        if fd is None:
            if len(self.fds) >= _MAX_OPEN:
                old_idx = next(iter(self.fds))
                os.close(self.fds.pop(old_idx))  # unflushed data stays in the page cache
            gen = self.map.gens[idx]
            try:
                fd = os.open(self.chunk_path(idx, gen), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise StorageError(
                    f"disk {self.name!r}: chunk {idx} version {gen} is missing from {self.chunks_dir}"
                ) from None
            self.fds[idx] = fd
        return fd

    def _mark_allocating(self) -> None:
        if not self.allocating:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
            _fsync_dir(self.path)
            self.allocating = True

    def _owns_version(self, idx: int) -> bool:
        """Whether the chunk's current version belongs to the live disk alone (no snapshot
        pins it, no other disk shares its file), so it is written in place rather than
        copied to a new version.

        A file with more than one link is shared with a clone (``clone_disk_at`` links the
        chunk versions of a snapshot into a new disk): neither disk may write it in place,
        whatever the snapshots, because the snapshot that pinned it when it was linked may
        be deleted later."""
        gen = self.map.gens[idx]
        if not gen or gen < self.watermark:
            return False
        return os.fstat(self._live_fd(idx)).st_nlink == 1

    def _writable_fd(self, idx: int, whole_chunk: bool) -> int:
        gen = self.map.gens[idx]
        if self._owns_version(idx):
            return self._live_fd(idx)
        shared = bool(gen) and gen >= self.watermark  # with a clone; no snapshot here pins it
        self._mark_allocating()
        new_gen = self.map.next_gen
        self.map.next_gen += 1
        shard_dir = os.path.dirname(self.chunk_path(idx, new_gen))
        if shard_dir not in self.dirty_dirs and not os.path.isdir(shard_dir):
            _makedirs_durable(shard_dir)
        path = self.chunk_path(idx, new_gen)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise StorageError(
                f"disk {self.name!r}: chunk file {path} already exists (corrupt generation counter)"
            ) from None
        try:
            if gen and not whole_chunk:
                _copy_sparse(self.chunk_path(idx, gen), fd)
                _start_writeback(fd, 0, 0)  # 0 length: to the end of the file
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
        old = self.fds.pop(idx, None)
        if old is not None:
            os.close(old)
        if len(self.fds) >= _MAX_OPEN:
            os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[idx] = fd
        self.map.gens[idx] = new_gen
        self.map_dirty = True
        self.dirty_dirs.add(shard_dir)
        if shared:
            self.released.append(self.chunk_path(idx, gen))
        return fd

    # -- I/O ------------------------------------------------------------------------------
    def write(self, offset: int, data: memoryview) -> None:
        cb = self.map.chunk_bytes
        total = len(data)
        pos = 0
        while pos < total:
            at = offset + pos
            idx, within = divmod(at, cb)
            take = min(cb - within, total - pos)
            whole = within == 0 and take >= self.map.extent(idx)
            if idx in self.inflight:
                self.settle(idx)  # the chunk's direct write lands before this one
            new_version = not self._owns_version(idx)  # _writable_fd makes it, empty when whole
            fd = self._writable_fd(idx, whole)
            if not (whole and new_version and take == cb and self._write_direct(idx, data[pos : pos + take])):
                _write_all(fd, data[pos : pos + take], within)
                _start_writeback(fd, within, take)
            self.dirty_chunks.add(idx)
            pos += take

    def _write_direct(self, idx: int, data: memoryview) -> bool:
        """Start writing a whole chunk into its just-created file with O_DIRECT, in the
        background: the bytes go from an aligned buffer to the device, with no page-cache
        copy and no write-back work (the initial copy and whole-chunk rewrites are most of
        what the apply engine writes), while the caller goes on with the next chunk.
        ``settle`` waits for such writes (``flush`` first of all, and raises their error).
        Returns False, and stops trying, where the file system refuses direct I/O."""
        if not self.direct_ok:
            return False
        path = self.chunk_path(idx, self.map.gens[idx])
        try:
            dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct_ok = False
            return False
        buf = None
        try:
            buf = self._direct_buffer()
            buf[: len(data)] = data
        except BaseException:
            os.close(dfd)
            if buf is not None:
                self.direct_free.append(buf)
            raise
        self.inflight[idx] = self.storage.direct_writers().submit(self._direct_write, dfd, path, buf, len(data))
        return True

    def _direct_buffer(self) -> mmap.mmap:
        while not self.direct_free:
            if len(self.direct_bufs) < _DIRECT_DEPTH:
                buf = mmap.mmap(-1, self.map.chunk_bytes)
                self.direct_bufs.append(buf)
                return buf
            wait(list(self.inflight.values()), return_when=FIRST_COMPLETED)
            self._reap()
        return self.direct_free.pop()

    def _direct_write(self, dfd: int, path: str, buf: mmap.mmap, length: int) -> None:
        """A background writer's task; the buffer is free again when it ends."""
        try:
            with memoryview(buf) as view:
                try:
                    _write_all(dfd, view[:length], 0)
                except OSError as e:
                    if e.errno != errno.EINVAL or os.fstat(dfd).st_size:
                        raise
                    self.direct_ok = False  # refused after all: through the page cache
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        _write_all(fd, view[:length], 0)
                    finally:
                        os.close(fd)
        finally:
            os.close(dfd)
            self.direct_free.append(buf)

    def _reap(self) -> None:
        for idx, fut in list(self.inflight.items()):
            if fut.done():
                del self.inflight[idx]
                if fut.exception() is not None and self.write_error is None:
                    self.write_error = fut.exception()

    def settle(self, idx: int | None = None, *, raise_error: bool = True) -> None:
        """Wait for the direct write of chunk ``idx`` (of every chunk, without one); with
        ``raise_error``, raise the error of a background write that failed."""
        pending = list(self.inflight.values()) if idx is None else [self.inflight[idx]]
        wait(pending)
        self._reap()
        if raise_error and self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise StorageError(f"disk {self.name!r}: writing a chunk failed: {error}") from error

    def read(self, m: _Map, offset: int, length: int, live: bool) -> bytes:
        cb = m.chunk_bytes
        pieces: list[bytes] = []
        pos = 0
        while pos < length:
            at = offset + pos
            idx, within = divmod(at, cb)
            take = min(cb - within, length - pos)
            gen = m.gens[idx]
            if not gen:
                pieces.append(bytes(take))
            else:
                if live:
                    if idx in self.inflight:
                        self.settle(idx)
                    piece = os.pread(self._live_fd(idx), take, within)
                else:
                    piece = self._read_pinned(idx, gen, take, within)
                if len(piece) < take:  # past the end of a sparse or shortened chunk file
                    piece += bytes(take - len(piece))
                pieces.append(piece)
            pos += take
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_pinned(self, idx: int, gen: int, take: int, within: int) -> bytes:
        try:
            fd = os.open(self.chunk_path(idx, gen), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageError(
                f"disk {self.name!r}: chunk {idx} version {gen} is missing from {self.chunks_dir}"
            ) from None
        try:
            out = []
            got = 0
            while got < take:
                piece = os.pread(fd, take - got, within + got)
                if not piece:
                    break
                out.append(piece)
                got += len(piece)
            return out[0] if len(out) == 1 else b"".join(out)
        finally:
            os.close(fd)

    def flush(self) -> None:
        self.settle()
        fds: list[int] = []
        opened: list[int] = []
        try:
            for idx in self.dirty_chunks:
                fd = self.fds.get(idx)
                if fd is None:  # its descriptor was recycled; the data is in the page cache
                    fd = os.open(self.chunk_path(idx, self.map.gens[idx]), os.O_RDONLY | os.O_CLOEXEC)
                    opened.append(fd)
                fds.append(fd)
            _fsync_all(fds)
        finally:
            for fd in opened:
                os.close(fd)
        self.dirty_chunks.clear()
        for d in self.dirty_dirs:
            _fsync_dir(d)
        self.dirty_dirs.clear()
        if self.map_dirty:
            self.write_map()
        if self.released:
            # Only the other disk's link remains, so it may write there in place again.
            touched = {os.path.dirname(p) for p in self.released if _unlink_quiet(p)}
            for d in touched:
                _fsync_dir(d)
            self.released.clear()
        if self.allocating:
            _unlink_quiet(self.marker)  # a lost unlink only costs an orphan scan on open
            self.allocating = False

    def write_map(self) -> None:
        self.map.token = int.from_bytes(os.urandom(8), "little")
        _atomic_write(self.map_path, self.map.encode(KIND_LIVE))
        self.map_dirty = False

    # -- snapshots ------------------------------------------------------------------------
    def snapshot_ids(self) -> list[str]:
        return [sid for sid, deleting in self._snapshot_files() if not deleting]

    def snapshot_map(self, sid: str) -> _Map:
        m = self.snap_maps.get(sid)
        if m is not None and not os.path.exists(self._snap_path(sid)):  # deleted elsewhere
            self.snap_maps.pop(sid, None)
            m = None
        if m is None:
            if not _SNAP_ID.match(sid or ""):
                raise SnapshotNotFound(f"disk {self.name!r} has no snapshot {sid!r}")
            try:
                m = _Map.read(self._snap_path(sid))
            except FileNotFoundError:
                raise SnapshotNotFound(f"disk {self.name!r} has no snapshot {sid!r}") from None
            if len(self.snap_maps) > 64:
                self.snap_maps.pop(next(iter(self.snap_maps)))
            self.snap_maps[sid] = m
        return m

    def snapshot(self) -> str:
        # Rewrite the live manifest (new token) before the snapshot exists, so that any other
        # handle reloads, and learns the new watermark, before it could write again.
        self.map_dirty = True
        self.flush()
        os.makedirs(self.snaps_dir, exist_ok=True)
        sid_num = max(self.last_snap_id + 1, time.time_ns())
        sid = f"{sid_num:020d}"
        snap = _Map(self.map.chunk_bytes, self.map.size, self.map.next_gen, time.time_ns(),
                    array.array("Q", self.map.gens))
        _atomic_write(self._snap_path(sid), snap.encode(KIND_SNAPSHOT))
        # From here on every current chunk version is pinned: writes copy before writing.
        self.snap_next_gen[sid] = self.map.next_gen
        self.watermark = max(self.watermark, self.map.next_gen)
        self.last_snap_id = sid_num
        self.snap_maps[sid] = snap
        return sid

    def delete_snapshot(self, sid: str) -> None:
        if not _SNAP_ID.match(sid or ""):
            return
        self.flush()  # the live map we compare against must be the durable one
        path = self._snap_path(sid)
        try:
            os.rename(path, self._snap_path(sid, deleting=True))
        except FileNotFoundError:
            return
        _fsync_dir(self.snaps_dir)
        self.snap_maps.pop(sid, None)
        self._finish_snapshot_delete(sid)

    def _finish_snapshot_delete(self, sid: str) -> None:
        doomed_path = self._snap_path(sid, deleting=True)
        doomed = _Map.read(doomed_path)
        others = self.snapshot_ids()
        older = [s for s in others if s < sid]
        newer = [s for s in others if s > sid]
        before = self.snapshot_map(older[-1]).gens if older else None
        after = self.snapshot_map(newer[0]).gens if newer else self.map.gens
        touched = set()
        for idx, gen in enumerate(doomed.gens):
            if not gen:
                continue
            if before is not None and idx < len(before) and before[idx] == gen:
                continue
            if idx < len(after) and after[idx] == gen:
                continue
            path = self.chunk_path(idx, gen)
            if _unlink_quiet(path):
                touched.add(os.path.dirname(path))
        for d in touched:
            _fsync_dir(d)
        os.unlink(doomed_path)
        _fsync_dir(self.snaps_dir)
        # Versions only the deleted snapshot pinned are gone, so the watermark may drop.
        self.snap_next_gen.pop(sid, None)
        self.watermark = max(self.snap_next_gen.values(), default=0)

    # -- resize ---------------------------------------------------------------------------
    def resize(self, size: int) -> None:
        self.flush()
        m = self.map
        if size == m.size:
            return
        cb = m.chunk_bytes
        new_count = -(-size // cb)
        if size > m.size:
            m.gens.extend(array.array("Q", bytes(8 * (new_count - len(m.gens)))))
            m.size = size
            self.map_dirty = True
            self.flush()
            return
        # Shrinking. Chunk files dropped below may outlive a crash: the marker finds them.
        self._mark_allocating()
        last = new_count - 1
        keep = size - last * cb
        if keep < cb and m.gens[last]:
            # Cut the tail of the new last chunk so that a later grow reads zeros there
            # (copying it first if a snapshot pins it).
            fd = self._writable_fd(last, whole_chunk=False)
            if os.fstat(fd).st_size > keep:
                os.ftruncate(fd, keep)
            self.dirty_chunks.add(last)
        # A live chunk version is pinned iff the newest snapshot has it (pins are contiguous).
        ids = self.snapshot_ids()
        pinned = self.snapshot_map(ids[-1]).gens if ids else array.array("Q")
        freed = []
        for idx in range(new_count, len(m.gens)):
            gen = m.gens[idx]
            if gen and not (idx < len(pinned) and pinned[idx] == gen):
                freed.append(self.chunk_path(idx, gen))
            fd = self.fds.pop(idx, None)
            if fd is not None:
                os.close(fd)
            self.dirty_chunks.discard(idx)
        del m.gens[new_count:]
        m.size = size
        self.map_dirty = True
        self.allocating = False  # keep the marker on disk until the files are gone
        self.flush()
        touched = {os.path.dirname(p) for p in freed if _unlink_quiet(p)}
        for d in touched:
            _fsync_dir(d)
        _unlink_quiet(self.marker)

    def used_bytes(self) -> int:
        return _tree_allocated(self.path)


def _tree_allocated(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += _allocated(os.stat(os.path.join(dirpath, f)))
            except FileNotFoundError:
                pass
    return total


def _copy_sparse(src_path: str, dst_fd: int) -> None:
    """Copy a chunk file into ``dst_fd``, only its allocated ranges (holes stay holes)."""
    try:
        src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StorageError(f"chunk file {src_path} is missing") from None
    try:
        size = os.fstat(src).st_size
        os.ftruncate(dst_fd, size)
        for start, end in _data_ranges(src, size):
            _copy_range(src, dst_fd, start, end - start)
    finally:
        os.close(src)


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    _copy_between(src, dst, offset, offset, length)


def _copy_between(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes from one file offset to another in the kernel."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            n = 0
        if n == 0:
            data = os.pread(src, min(length - done, 1 << 20), src_offset + done)
            if not data:
                raise StorageError("file shrank while being copied")
            _write_all(dst, memoryview(data), dst_offset + done)
            n = len(data)
        done += n


_FICLONERANGE = 0x4020940D  # Linux: share a range of one file's blocks with another (reflink)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTTY, errno.ENOSYS, errno.EBADF, errno.EPERM}


def _reflink(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    fcntl.ioctl(dst, _FICLONERANGE, struct.pack("=qQQQ", src, src_offset, length, dst_offset))


def _data_ranges(fd: int, limit: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the allocated ranges of a file, below ``limit``."""
    size = min(os.fstat(fd).st_size, limit)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole remains
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _read_into(fd: int, view: memoryview) -> int:
    """Fill ``view`` from the start of the file; the bytes read (fewer at its end)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            break
        got += n
    return got


# ----------------------------------------------------------------------------------------
# the storage


class LocalStorage(Storage):
    def __init__(self, root: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes <= 0 or chunk_bytes % 4096:
            raise InvalidRequest("chunk_bytes must be a positive multiple of 4096")
        self.root = os.path.abspath(root)
        self.chunk_bytes = chunk_bytes
        self.objects_root = os.path.join(self.root, "objects")
        self.disks_root = os.path.join(self.root, "disks")
        _makedirs_durable(self.objects_root)
        _makedirs_durable(self.disks_root)
        self._disks: dict[str, _Disk] = {}
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
            _makedirs_durable(os.path.dirname(path))
        except (StorageError, NotADirectoryError):
            raise InvalidRequest(f"object key {key!r} lies under an existing object") from None
        return path

    def put_object(self, key: str, data: bytes | bytearray | memoryview) -> None:
        _atomic_write(self._object_path_for_put(key), data)

    def put_object_file(self, key: str, path: str) -> None:
        """A hard link to the (durable) file when it is on this file system: the object costs
        a directory entry, not a copy. Elsewhere, a kernel-side copy, fsync'd."""
        dst = self._object_path_for_put(key)
        directory = os.path.dirname(dst)
        tmp = os.path.join(directory, f".tmp-{os.path.basename(dst)}-{secrets.token_hex(6)}")
        try:
            os.link(path, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            _copy_file_durably(path, tmp)
        try:
            os.replace(tmp, dst)
        finally:
            _unlink_quiet(tmp)  # left in place when dst already was this very file
        _fsync_dir(directory)

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
        _fsync_dir(os.path.dirname(path))

    # -- disks ----------------------------------------------------------------------------
    def _disk_path(self, name: str) -> str:
        return os.path.join(self.disks_root, check_disk_name(name))

    def _disk(self, name: str, *, for_write: bool = False) -> _Disk:
        """The disk's handle, current; ``for_write`` for anything that changes the disk."""
        d = self._disks.get(name)
        if d is None:
            d = _Disk(self, name, self._disk_path(name))
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
            _makedirs_durable(os.path.join(path, "chunks"))
            _makedirs_durable(os.path.join(path, "snapshots"))
            count = -(-size_bytes // self.chunk_bytes)
            m = _Map(self.chunk_bytes, size_bytes, 1, time.time_ns(), array.array("Q", bytes(8 * count)),
                     int.from_bytes(os.urandom(8), "little"))
            _atomic_write(os.path.join(path, "disk.map"), m.encode(KIND_LIVE))
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
            _fsync_dir(self.disks_root)
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
                    total += _allocated(os.stat(self._object_path(key)))
                except FileNotFoundError:
                    pass
            for n in sorted(os.listdir(self.disks_root)):
                if n.startswith(".") or not n.startswith(prefix):
                    continue
                total += _tree_allocated(os.path.join(self.disks_root, n))
        return total

    # -- recovery: digests, exports and clones of a snapshot ----------------------------
    # A snapshot's chunk versions never change while it exists, so these read them without
    # holding the storage's lock; a file that disappears means the snapshot was deleted.

    def _pinned(self, name: str, snapshot: str) -> tuple[_Disk, _Map]:
        with self._lock:
            d = self._disk(name)
            return d, d.snapshot_map(snapshot)

    def _open_pinned(self, d: _Disk, snapshot: str, idx: int, gen: int) -> int:
        try:
            return os.open(d.chunk_path(idx, gen), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._gone(d, snapshot, idx, gen)
            raise  # not reached

    def _gone(self, d: _Disk, snapshot: str, idx: int, gen: int) -> None:
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
                got = _read_into(fd, view)
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
                    for start, end in _data_ranges(src, m.extent(idx)):
                        at = idx * cb + start
                        if reflink:
                            try:
                                _reflink(src, fd, start, at, end - start)
                                cloned += end - start
                                continue
                            except OSError as e:
                                if e.errno in _NO_REFLINK:
                                    reflink = False  # this file system cannot: copy from now on
                                elif e.errno != errno.EINVAL:  # EINVAL: this range is not aligned
                                    raise
                        _copy_between(src, fd, start, at, end - start)
                        _start_writeback(fd, at, end - start)
                        copied += end - start
                finally:
                    os.close(src)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
        os.close(fd)
        if durable:
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
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
            _makedirs_durable(os.path.join(dest, "chunks"))
            _makedirs_durable(os.path.join(dest, "snapshots"))
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
                _fsync_dir(shard)
            _fsync_dir(os.path.join(dest, "chunks"))
            # The snapshot still existing now means it pinned every linked version from the
            # moment its map was read (a deleted snapshot never comes back): the links hold
            # exactly its bytes.
            if not os.path.exists(d._snap_path(snapshot)):
                raise SnapshotNotFound(f"disk {name!r} has no snapshot {snapshot!r} (deleted meanwhile)")
            clone = _Map(m.chunk_bytes, m.size, m.next_gen, time.time_ns(), array.array("Q", m.gens),
                         int.from_bytes(os.urandom(8), "little"))
            _atomic_write(os.path.join(dest, "disk.map"), clone.encode(KIND_LIVE))
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
                if _CHUNK_FILE.match(f):
                    yield os.path.join(dirpath, f)

    def close(self) -> None:
        with self._lock:
            for d in self._disks.values():
                d.close_fds()
            self._disks.clear()
            if self._writers is not None and self._writers_pid == os.getpid():
                self._writers.shutdown(wait=True)
            self._writers = None
