"""One disk of local storage: chunk versions, copy-on-write, snapshots, crash recovery.

How a disk is laid out and kept crash-safe is told in ``local`` (the module of
``LocalStorage``, which holds a ``LocalDisk`` per disk it has opened).
"""
from __future__ import annotations

import array
import errno
import mmap
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from mobility.durable import TEMP_PREFIX, fsync_dir, makedirs_durable, replace_durably, unlink_quietly, write_all

from .base import DiskNotFound, SnapshotNotFound, StorageError
from .local_files import copy_sparse, fsync_all, start_writeback, tree_allocated
from .local_map import KIND_LIVE, KIND_SNAPSHOT, ChunkMap

if TYPE_CHECKING:  # local imports this module to open its disks
    from .local import LocalStorage

SHARD = 1024  # chunk files per directory
SNAP_ID = re.compile(r"^[0-9]{20}$")
CHUNK_FILE = re.compile(r"^([0-9]+)\.([0-9]+)$")
_MAX_OPEN = 256
_DIRECT_DEPTH = 4  # whole-chunk direct writes under way at once, per disk
_PREPARE_THREADS = 4  # chunk versions made at once by ``prepare``


class LocalDisk:
    """One disk of a ``LocalStorage``: its live chunk map, its snapshots, its chunk files."""

    def __init__(self, storage: LocalStorage, name: str, path: str):
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
        self.snap_maps: dict[str, ChunkMap] = {}
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
            self.map = ChunkMap.read(self.map_path)
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
                next_gen, _token = ChunkMap.read_header(self._snap_path(sid, deleting))
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
            if SNAP_ID.match(sid) and ext in ("map", "deleting"):
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
                m = CHUNK_FILE.match(fname)
                if not m:
                    if fname.startswith(TEMP_PREFIX):
                        unlink_quietly(os.path.join(shard_dir, fname))
                    continue
                idx, gen = int(m.group(1)), int(m.group(2))
                highest = max(highest, gen)
                if (idx, gen) not in referenced:
                    unlink_quietly(os.path.join(shard_dir, fname))
                    touched.add(shard_dir)
        for d in touched:
            fsync_dir(d)
        self.map.next_gen = max(self.map.next_gen, highest + 1)
        unlink_quietly(self.marker)
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
            _next_gen, token = ChunkMap.read_header(self.map_path)
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
            fsync_dir(self.path)
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
        new_gen = self._next_version(idx)
        fd = self._make_version(idx, gen if not whole_chunk else 0, new_gen)
        old = self.fds.pop(idx, None)
        if old is not None:
            os.close(old)
        if len(self.fds) >= _MAX_OPEN:
            os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[idx] = fd
        self.map.gens[idx] = new_gen
        self.map_dirty = True
        if shared:
            self.released.append(self.chunk_path(idx, gen))
        return fd

    def _next_version(self, idx: int) -> int:
        """A new version number for chunk ``idx``, its shard directory made (and owed an fsync)."""
        new_gen = self.map.next_gen
        self.map.next_gen += 1
        shard_dir = os.path.dirname(self.chunk_path(idx, new_gen))
        if shard_dir not in self.dirty_dirs and not os.path.isdir(shard_dir):
            makedirs_durable(shard_dir)
        self.dirty_dirs.add(shard_dir)
        return new_gen

    def _make_version(self, idx: int, gen: int, new_gen: int) -> int:
        """Create chunk ``idx``'s version ``new_gen`` as a copy of version ``gen`` (empty for
        0) and return it open for writing; nothing is left behind on an error."""
        path = self.chunk_path(idx, new_gen)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise StorageError(
                f"disk {self.name!r}: chunk file {path} already exists (corrupt generation counter)"
            ) from None
        try:
            if gen:
                copy_sparse(self.chunk_path(idx, gen), fd)
                start_writeback(fd, 0, 0)  # 0 length: to the end of the file
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        return fd

    def prepare(self, extents: list[tuple[int, int]]) -> None:
        """Make ahead, several at once, the new versions of the chunks that writes to these
        (offset, length) extents will copy: a chunk written in part whose current version a
        snapshot pins or a clone shares. ``write`` then finds each one made and writes in
        place. Creating a chunk file and copying it into the page cache mostly wait (on
        the file system's journal, on memory): done one after the other, as ``write`` does,
        they were most of a resync's apply time. The files, the marker and the state are
        those ``_writable_fd`` makes (the live map durable only at ``flush``), so a crash
        leaves what it would: orphans the marker finds."""
        cb = self.map.chunk_bytes
        whole: set[int] = set()
        partial: set[int] = set()
        for offset, length in extents:
            if length <= 0 or offset < 0 or offset + length > self.map.size:
                continue  # ``write`` rejects or ignores it
            for idx in range(offset // cb, (offset + length - 1) // cb + 1):
                start, end = max(offset, idx * cb), min(offset + length, idx * cb + cb)
                (whole if start == idx * cb and end - start >= self.map.extent(idx) else partial).add(idx)
        todo = sorted(idx for idx in partial - whole if idx not in self.inflight and not self._owns_version(idx))
        if len(todo) < 2:
            return
        self._mark_allocating()
        jobs: list[tuple[int, int, int]] = []  # chunk, its current version, its new version
        for idx in todo:
            jobs.append((idx, self.map.gens[idx], self._next_version(idx)))

        def make(job: tuple[int, int, int]) -> None:
            os.close(self._make_version(*job))

        with ThreadPoolExecutor(max_workers=_PREPARE_THREADS, thread_name_prefix="storage-prepare") as pool:
            futures = [pool.submit(make, job) for job in jobs]
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:  # none is used: the files made are removed (the marker covers a crash here)
            for (idx, _gen, new_gen), f in zip(jobs, futures):
                if f.exception() is None:
                    unlink_quietly(self.chunk_path(idx, new_gen))
            raise failed[0]
        for idx, gen, new_gen in jobs:
            old = self.fds.pop(idx, None)
            if old is not None:
                os.close(old)
            if gen and gen >= self.watermark:  # shared with a clone; no snapshot here pins it
                self.released.append(self.chunk_path(idx, gen))
            self.map.gens[idx] = new_gen
            self.dirty_chunks.add(idx)
        self.map_dirty = True

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
                write_all(fd, data[pos : pos + take], within)
                start_writeback(fd, within, take)
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
                    write_all(dfd, view[:length], 0)
                except OSError as e:
                    if e.errno != errno.EINVAL or os.fstat(dfd).st_size:
                        raise
                    self.direct_ok = False  # refused after all: through the page cache
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        write_all(fd, view[:length], 0)
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

    def read(self, m: ChunkMap, offset: int, length: int, live: bool) -> bytes:
        cb = m.chunk_bytes
        pieces: list[bytes] = []
        pos = 0
        if live and length > cb:
            # A read of several chunk files: their reads are started at once (a device answers
            # several faster than one after the other; each file's own read-ahead starts small).
            for idx in range(offset // cb, (offset + length - 1) // cb + 1):
                if m.gens[idx] and idx not in self.inflight:
                    os.posix_fadvise(self._live_fd(idx), 0, 0, os.POSIX_FADV_WILLNEED)
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
            fsync_all(fds)
        finally:
            for fd in opened:
                os.close(fd)
        self.dirty_chunks.clear()
        for d in self.dirty_dirs:
            fsync_dir(d)
        self.dirty_dirs.clear()
        if self.map_dirty:
            self.write_map()
        if self.released:
            # Only the other disk's link remains, so it may write there in place again.
            touched = {os.path.dirname(p) for p in self.released if unlink_quietly(p)}
            for d in touched:
                fsync_dir(d)
            self.released.clear()
        if self.allocating:
            unlink_quietly(self.marker)  # a lost unlink only costs an orphan scan on open
            self.allocating = False

    def write_map(self) -> None:
        self.map.token = int.from_bytes(os.urandom(8), "little")
        replace_durably(self.map_path, self.map.encode(KIND_LIVE))
        self.map_dirty = False

    # -- snapshots ------------------------------------------------------------------------
    def snapshot_ids(self) -> list[str]:
        return [sid for sid, deleting in self._snapshot_files() if not deleting]

    def snapshot_map(self, sid: str) -> ChunkMap:
        m = self.snap_maps.get(sid)
        if m is not None and not os.path.exists(self._snap_path(sid)):  # deleted elsewhere
            self.snap_maps.pop(sid, None)
            m = None
        if m is None:
            if not SNAP_ID.match(sid or ""):
                raise SnapshotNotFound(f"disk {self.name!r} has no snapshot {sid!r}")
            try:
                m = ChunkMap.read(self._snap_path(sid))
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
        snap = ChunkMap(self.map.chunk_bytes, self.map.size, self.map.next_gen, time.time_ns(),
                    array.array("Q", self.map.gens))
        replace_durably(self._snap_path(sid), snap.encode(KIND_SNAPSHOT))
        # From here on every current chunk version is pinned: writes copy before writing.
        self.snap_next_gen[sid] = self.map.next_gen
        self.watermark = max(self.watermark, self.map.next_gen)
        self.last_snap_id = sid_num
        self.snap_maps[sid] = snap
        return sid

    def delete_snapshot(self, sid: str) -> None:
        if not SNAP_ID.match(sid or ""):
            return
        self.flush()  # the live map we compare against must be the durable one
        path = self._snap_path(sid)
        try:
            os.rename(path, self._snap_path(sid, deleting=True))
        except FileNotFoundError:
            return
        fsync_dir(self.snaps_dir)
        self.snap_maps.pop(sid, None)
        self._finish_snapshot_delete(sid)

    def _finish_snapshot_delete(self, sid: str) -> None:
        doomed_path = self._snap_path(sid, deleting=True)
        doomed = ChunkMap.read(doomed_path)
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
            if unlink_quietly(path):
                touched.add(os.path.dirname(path))
        for d in touched:
            fsync_dir(d)
        os.unlink(doomed_path)
        fsync_dir(self.snaps_dir)
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
        touched = {os.path.dirname(p) for p in freed if unlink_quietly(p)}
        for d in touched:
            fsync_dir(d)
        unlink_quietly(self.marker)

    def used_bytes(self) -> int:
        return tree_allocated(self.path)

