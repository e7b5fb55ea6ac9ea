"""Batch-sized buffers kept for reuse, and durable files written straight to the device.

A process server handles megabytes per batch, over and over. ``BufferPool`` hands out
page-aligned buffers (anonymous memory maps) and takes them back for the next batch, so no
batch pays for zeroing or faulting in fresh memory, and the buffers are aligned for direct
I/O. ``write_new_file`` writes such a buffer into a new file with O_DIRECT: the bytes go from
the buffer to the device, with no page-cache copy and no write-back for ``fsync`` to wait
for; ``read_file`` reads a whole file into one the same way. Where the file system refuses
direct I/O, both go through the page cache instead.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading

from mobility.durable import write_all

ALIGN = 4096  # direct I/O alignment of memory, offsets and lengths (any device's block)
STEP = 1024 * 1024  # buffer sizes are whole MiB, so batches of similar size share them


class BufferPool:
    """Page-aligned buffers of at least the size asked for; up to ``keep_bytes`` of them
    are kept between uses (the rest are unmapped when given back)."""

    def __init__(self, *, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[mmap.mmap] = []
        self._kept = 0
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        return self._kept

    def take(self, size: int) -> mmap.mmap:
        want = max(STEP, -(-size // STEP) * STEP)
        with self._lock:
            fits = [b for b in self._free if want <= len(b) <= 2 * want]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
                self._kept -= len(buf)
                return buf
        return mmap.mmap(-1, want)

    def give(self, buf: mmap.mmap) -> None:
        """Take a buffer back; no view of it may remain."""
        with self._lock:
            if self._kept + len(buf) <= self.keep_bytes:
                self._free.append(buf)
                self._kept += len(buf)
                return
        try:
            buf.close()
        except BufferError:  # a view of it is still alive: unmapped once that goes too
            pass


class _DirectIO:
    supported = hasattr(os, "O_DIRECT")  # until a file system refuses it


def write_new_file(path: str, buf: mmap.mmap, size: int, *, mode: int = 0o600) -> None:
    """Create ``path`` (it must not exist) holding ``buf[:size]`` and fsync it. ``buf`` is a
    buffer of a ``BufferPool`` (page-aligned, whole MiB): with direct I/O its last block is
    written whole, the tail zeroed, and the file then cut to ``size``."""
    padded = -(-size // ALIGN) * ALIGN
    if padded > len(buf):
        raise ValueError(f"{size} bytes do not fit a {len(buf)}-byte buffer")
    with memoryview(buf) as view:
        if _DirectIO.supported and _write_direct(path, view, size, padded, mode):
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            write_all(fd, view[:size])
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_direct(path: str, view: memoryview, size: int, padded: int, mode: int) -> bool:
    """False (and nothing left behind) where the file system refuses direct I/O."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT, mode)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _DirectIO.supported = False
        return False
    try:
        view[size:padded] = bytes(padded - size)
        try:
            write_all(fd, view[:padded])
        except OSError as e:
            if e.errno != errno.EINVAL or os.fstat(fd).st_size:
                raise
            _DirectIO.supported = False
            os.close(fd)
            fd = -1
            os.unlink(path)
            return False
        os.ftruncate(fd, size)
        os.fsync(fd)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


class Held:
    """Bytes held in a buffer of a ``BufferPool`` (``view``) until ``release`` gives the
    buffer back; a context manager. Without a pool it simply holds a bytes object."""

    def __init__(self, data: bytes | mmap.mmap, size: int, pool: BufferPool | None = None) -> None:
        self._data = data
        self._pool = pool
        self.view = memoryview(data)[:size]

    def release(self) -> None:
        if self._data is None:
            return
        self.view.release()
        if self._pool is not None:
            self._pool.give(self._data)
        self._data = None

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_file(path: str, pool: BufferPool) -> Held:
    """The whole of a file (written once, read once: a replication log) in a pooled buffer,
    read with O_DIRECT where the file system allows it, so it never passes through (nor
    stays in) the page cache."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    direct = _DirectIO.supported
    try:
        fd = os.open(path, flags | os.O_DIRECT if direct else flags)
    except OSError as e:
        if not direct or e.errno != errno.EINVAL:
            raise
        _DirectIO.supported = direct = False
        fd = os.open(path, flags)
    try:
        size = os.fstat(fd).st_size
        padded = -(-size // ALIGN) * ALIGN
        buf = pool.take(padded or ALIGN)
        try:
            with memoryview(buf) as view:
                got = 0
                while got < size:
                    try:
                        n = os.preadv(fd, [view[got:padded]], got)
                    except OSError as e:
                        if not direct or e.errno != errno.EINVAL or got:
                            raise
                        _DirectIO.supported = direct = False
                        os.close(fd)
                        fd = os.open(path, flags)
                        continue
                    if not n:
                        raise OSError(errno.EIO, f"{path} ended at {got} of its {size} bytes while being read")
                    got += n
        except BaseException:
            pool.give(buf)
            raise
        return Held(buf, size, pool)
    finally:
        os.close(fd)
