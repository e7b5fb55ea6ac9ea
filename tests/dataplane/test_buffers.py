"""Pooled, page-aligned buffers and the direct-I/O files the process server and the apply
engine write and read with them: exact bytes whatever the size, with direct I/O and where a
file system refuses it."""
from __future__ import annotations

import ctypes
import os
import random

import pytest

from replication.dataplane import buffers
from replication.dataplane.buffers import ALIGN, STEP, BufferPool, read_file, write_new_file

try:
    from tests.dataplane.directio import refuse_direct_io
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from directio import refuse_direct_io  # type: ignore[no-redef]

SIZES = [0, 1, 511, 4095, 4096, 4097, STEP - 1, STEP, STEP + 4097]


def address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.fixture(params=[True, False], ids=["direct-io", "no-direct-io"])
def direct(request, monkeypatch):
    """Run with direct I/O, and on a file system that refuses it (EINVAL, as tmpfs does)."""
    monkeypatch.setattr(buffers._DirectIO, "supported", hasattr(os, "O_DIRECT"))
    if not request.param:
        refuse_direct_io(monkeypatch)
    return request.param


def test_pool_hands_out_aligned_buffers_and_reuses_them_within_its_bound():
    pool = BufferPool(keep_bytes=3 * STEP)
    a = pool.take(10)
    assert len(a) == STEP and address(a) % ALIGN == 0
    b = pool.take(STEP + 1)
    assert len(b) == 2 * STEP and address(b) % ALIGN == 0
    pool.give(a)
    pool.give(b)
    assert pool.kept_bytes == 3 * STEP
    assert pool.take(STEP + 5) is b  # the smallest kept buffer that fits
    assert pool.take(100) is a
    assert pool.kept_bytes == 0
    c = pool.take(8 * STEP)  # never one more than twice too big: a fresh one
    assert c is not a and c is not b and len(c) == 8 * STEP
    pool.give(c)  # over the bound: unmapped, not kept
    assert pool.kept_bytes == 0 and c.closed
    pool.give(a)
    view = memoryview(b)
    pool.give(b)  # kept (still within the bound) even while a view is alive
    view.release()
    assert pool.kept_bytes == 3 * STEP


@pytest.mark.parametrize("size", SIZES)
def test_new_files_hold_exactly_the_bytes(tmp_path, direct, size):
    pool = BufferPool(keep_bytes=0)
    buf = pool.take(size)
    data = random.Random(size).randbytes(size)
    buf[:size] = data
    buf[size:] = b"\xff" * (len(buf) - size)  # whatever the rest of the buffer holds
    path = str(tmp_path / "f.lbs")
    write_new_file(path, buf, size)
    with open(path, "rb") as f:
        assert f.read() == data
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):  # never over an existing file
        write_new_file(path, buf, size)
    with read_file(path, pool) as held:
        assert held.view == data
    assert buffers._DirectIO.supported is direct


def test_read_file_gives_its_buffer_back_and_reports_a_missing_file(tmp_path, direct):
    pool = BufferPool(keep_bytes=4 * STEP)
    path = tmp_path / "log.lbs"
    path.write_bytes(b"sealed" * 1000)
    held = read_file(str(path), pool)
    assert held.view == b"sealed" * 1000
    assert pool.kept_bytes == 0
    held.release()
    held.release()  # twice is harmless
    assert pool.kept_bytes == STEP
    with pytest.raises(FileNotFoundError):
        read_file(str(tmp_path / "missing.lbs"), pool)
    assert pool.kept_bytes == STEP


def test_a_buffer_too_small_for_the_bytes_is_refused(tmp_path):
    buf = BufferPool(keep_bytes=0).take(1)
    with pytest.raises(ValueError):
        write_new_file(str(tmp_path / "f"), buf, len(buf) + 1)
    assert not (tmp_path / "f").exists()
