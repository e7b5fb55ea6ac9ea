"""File operations of local storage: copies that keep holes, reflinks, write-back hints.

Chunk versions are sparse files: ``copy_sparse`` copies only a file's allocated ranges
(``data_ranges``: SEEK_DATA/SEEK_HOLE), in the kernel (``copy_between``:
``copy_file_range``, or read and write where it cannot); ``reflink_range`` shares a range's
blocks with another file where the file system can. ``start_writeback`` starts writing dirty
pages back at once (Linux's ``sync_file_range``), so a later ``fsync_all`` has little left
to wait for. Writing files durably is ``mobility.durable``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
import sys
from typing import Iterator

from mobility.durable import create_durably, write_all

from .base import StorageError


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


def start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a hint: errors are harmless


def fsync_all(fds: list[int]) -> None:
    # Serially: fsyncing in parallel threads measured no faster here (the device is the
    # limit), and start_writeback already moved most of the waiting out of this call.
    for fd in fds:
        os.fsync(fd)
        # Replica data is written once and read rarely (a failover, an export): once it is
        # durable its pages leave the page cache, so the next writes reuse that memory
        # instead of growing the cache over pages other work needs.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def copy_file_durably(src_path: str, dst_path: str) -> None:
    """Copy a file to a new path in the kernel (copy_file_range), fsync'd."""
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        create_durably(dst_path, lambda fd: copy_range(src.fileno(), fd, 0, size))


def allocated(st: os.stat_result) -> int:
    return st.st_blocks * 512


def tree_allocated(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += allocated(os.stat(os.path.join(dirpath, f)))
            except FileNotFoundError:
                pass
    return total


def copy_sparse(src_path: str, dst_fd: int) -> None:
    """Copy a chunk file into ``dst_fd``, only its allocated ranges (holes stay holes)."""
    try:
        src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StorageError(f"chunk file {src_path} is missing") from None
    try:
        size = os.fstat(src).st_size
        os.ftruncate(dst_fd, size)
        for start, end in data_ranges(src, size):
            copy_range(src, dst_fd, start, end - start)
    finally:
        os.close(src)


def copy_range(src: int, dst: int, offset: int, length: int) -> None:
    copy_between(src, dst, offset, offset, length)


def copy_between(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
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
            write_all(dst, memoryview(data), dst_offset + done)
            n = len(data)
        done += n


_FICLONERANGE = 0x4020940D  # Linux: share a range of one file's blocks with another (reflink)
NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTTY, errno.ENOSYS, errno.EBADF, errno.EPERM}


def reflink_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    fcntl.ioctl(dst, _FICLONERANGE, struct.pack("=qQQQ", src, src_offset, length, dst_offset))


def data_ranges(fd: int, limit: int) -> Iterator[tuple[int, int]]:
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


def read_into(fd: int, view: memoryview) -> int:
    """Fill ``view`` from the start of the file; the bytes read (fewer at its end)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            break
        got += n
    return got

