"""The storage contract, run against both backends (local directory and Azurite), plus the
local backend's copy-on-write accounting and crash safety."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from replication.dataplane.storage import (
    DiskExists,
    DiskNotFound,
    InvalidRequest,
    ObjectNotFound,
    SnapshotNotFound,
    open_storage,
)
from replication.dataplane.storage.local import LocalStorage

try:
    from tests.dataplane.azurite import azurite, storage  # noqa: F401 - fixtures
    from tests.dataplane.directio import refuse_direct_io
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from azurite import azurite, storage  # type: ignore[no-redef]  # noqa: F401
    from directio import refuse_direct_io  # type: ignore[no-redef]

MiB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_sha(s, name: str, snapshot: str | None = None) -> str:
    h = hashlib.sha256()
    for piece in s.iter_disk(name, snapshot=snapshot, chunk_bytes=MiB + 4096):
        h.update(piece)
    return h.hexdigest()


def random_aligned_writes(rng: random.Random, model: bytearray, count: int, max_sectors: int = 600):
    out = []
    size = len(model)
    for _ in range(count):
        length = rng.randint(1, max_sectors) * 512
        length = min(length, size)
        offset = rng.randrange(0, (size - length) // 512 + 1) * 512
        data = rng.randbytes(length)
        model[offset : offset + length] = data
        out.append((offset, data))
    return out


# -- cache objects --------------------------------------------------------------------------


def test_objects_put_get_list_delete(storage):
    storage.put_object("logs/a/00000000000000000001.lbs", b"one")
    storage.put_object("logs/a/00000000000000000002.lbs", b"two")
    storage.put_object("logs/ab/00000000000000000001.lbs", b"other item")
    storage.put_object("replicas/a/state.json", b"{}")

    assert storage.get_object("logs/a/00000000000000000002.lbs") == b"two"
    assert storage.list_objects("logs/a/") == [
        "logs/a/00000000000000000001.lbs",
        "logs/a/00000000000000000002.lbs",
    ]
    # A prefix is a plain string prefix, not a directory.
    assert storage.list_objects("logs/a") == [
        "logs/a/00000000000000000001.lbs",
        "logs/a/00000000000000000002.lbs",
        "logs/ab/00000000000000000001.lbs",
    ]
    assert storage.list_objects("") == sorted(storage.list_objects("")) and len(storage.list_objects("")) == 4
    assert storage.list_objects("nothing/") == []

    # Replacing is atomic and idempotent.
    storage.put_object("logs/a/00000000000000000001.lbs", b"ONE, replaced")
    storage.put_object("logs/a/00000000000000000001.lbs", b"ONE, replaced")
    assert storage.get_object("logs/a/00000000000000000001.lbs") == b"ONE, replaced"
    assert len(storage.list_objects("logs/a/")) == 2

    storage.put_object("big/object", memoryview(bytes(range(256)) * 40000))
    assert storage.get_object("big/object") == bytes(range(256)) * 40000

    storage.delete_object("logs/a/00000000000000000001.lbs")
    storage.delete_object("logs/a/00000000000000000001.lbs")  # deleting twice is fine
    with pytest.raises(ObjectNotFound, match="logs/a/00000000000000000001.lbs"):
        storage.get_object("logs/a/00000000000000000001.lbs")
    assert storage.list_objects("logs/a/") == ["logs/a/00000000000000000002.lbs"]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../escape", "a/../b", "a/.hidden", "a/"])
def test_objects_reject_bad_keys(storage, key):
    with pytest.raises(InvalidRequest):
        storage.put_object(key, b"x")


def test_objects_from_files(storage, tmp_path):
    """put_object_file stores a durable file's bytes under a key and leaves the file alone;
    putting again, or another file over the object, behaves as put_object does."""
    first, second = tmp_path / "first.lbs", tmp_path / "second.lbs"
    first.write_bytes(os.urandom(300_000))
    second.write_bytes(b"second")
    storage.put_object_file("logs/f/00000000000000000001.lbs", str(first))
    storage.put_object_file("logs/f/00000000000000000001.lbs", str(first))  # a re-upload after a crash
    assert storage.get_object("logs/f/00000000000000000001.lbs") == first.read_bytes()
    storage.put_object_file("logs/f/00000000000000000001.lbs", str(second))
    assert storage.get_object("logs/f/00000000000000000001.lbs") == b"second"
    assert storage.list_objects("logs/f/") == ["logs/f/00000000000000000001.lbs"]
    assert first.exists() and second.read_bytes() == b"second"
    with pytest.raises(InvalidRequest):
        storage.put_object_file("logs/f/../x", str(first))


def test_local_object_from_a_file_is_a_link_or_a_copy(tmp_path, monkeypatch):
    """On the same file system the object is the file itself (no bytes written twice); where
    a link is impossible (another file system) it is a copy, and removing the source never
    touches the object."""
    s = LocalStorage(str(tmp_path / "store"))
    src = tmp_path / "batch.lbs"
    src.write_bytes(os.urandom(100_000))
    s.put_object_file("logs/l/1", str(src))
    obj = tmp_path / "store" / "objects" / "logs" / "l" / "1"
    assert os.stat(obj).st_ino == os.stat(src).st_ino and os.stat(src).st_nlink == 2

    def no_link(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    s.put_object_file("logs/l/2", str(src))
    obj2 = tmp_path / "store" / "objects" / "logs" / "l" / "2"
    assert os.stat(obj2).st_ino != os.stat(src).st_ino and obj2.read_bytes() == src.read_bytes()
    data = src.read_bytes()
    src.unlink()
    assert s.get_object("logs/l/1") == data == s.get_object("logs/l/2")
    leftovers = [n for _d, _s, files in os.walk(tmp_path / "store" / "objects") for n in files if n.startswith(".")]
    assert leftovers == []


def test_local_put_leaves_no_temporary_files(tmp_path):
    s = LocalStorage(str(tmp_path))
    for i in range(20):
        s.put_object("logs/x/obj", os.urandom(1000 + i))
    leftovers = [n for _d, _s, files in os.walk(tmp_path / "objects") for n in files if n.startswith(".")]
    assert leftovers == []
    assert s.list_objects("") == ["logs/x/obj"]


# -- disks ----------------------------------------------------------------------------------


def test_disk_write_read_and_errors(storage):
    size = 3 * MiB + 1536  # not a whole number of local chunks
    storage.create_disk("d0", size)
    with pytest.raises(DiskExists):
        storage.create_disk("d0", size)
    assert storage.disk_exists("d0") and not storage.disk_exists("nope")
    assert storage.disk_size("d0") == size
    assert storage.read_disk("d0", 0, 4096) == bytes(4096)

    rng = random.Random(1)
    model = bytearray(size)
    for offset, data in random_aligned_writes(rng, model, 30):
        storage.write_disk("d0", offset, data)
    # Writes across a chunk boundary and at the very end.
    edge = rng.randbytes(8192)
    storage.write_disk("d0", MiB - 4096, memoryview(edge))
    model[MiB - 4096 : MiB + 4096] = edge
    tail = rng.randbytes(1536)
    storage.write_disk("d0", size - 1536, tail)
    model[size - 1536 :] = tail
    storage.flush_disk("d0")

    assert storage.read_disk("d0", 0, size) == bytes(model)
    assert storage.read_disk("d0", 12345, 999) == bytes(model[12345 : 12345 + 999])  # reads need no alignment
    assert disk_sha(storage, "d0") == sha(model)

    with pytest.raises(InvalidRequest, match="aligned"):
        storage.write_disk("d0", 100, b"x" * 512)
    with pytest.raises(InvalidRequest, match="aligned"):
        storage.write_disk("d0", 0, b"x" * 100)
    with pytest.raises(InvalidRequest, match="past"):
        storage.write_disk("d0", size - 512, b"x" * 1024)
    with pytest.raises(InvalidRequest, match="outside"):
        storage.read_disk("d0", size - 10, 11)
    with pytest.raises(DiskNotFound):
        storage.read_disk("nope", 0, 512)
    with pytest.raises(DiskNotFound):
        storage.write_disk("nope", 0, b"x" * 512)
    with pytest.raises(InvalidRequest):
        storage.create_disk("bad/name", MiB)
    with pytest.raises(InvalidRequest):
        storage.create_disk("odd", 1000)
    assert storage.read_disk("d0", 0, size) == bytes(model)  # rejected writes changed nothing


def test_disk_write_larger_than_one_page_write(storage):
    size = 10 * MiB
    storage.create_disk("big", size)
    data = random.Random(2).randbytes(9 * MiB + 512)  # Azure splits this into 4 MiB page writes
    storage.write_disk("big", 512, data)
    storage.flush_disk("big")
    assert storage.read_disk("big", 512, len(data)) == data
    assert storage.read_disk("big", 0, 512) == bytes(512)


def test_snapshots_freeze_bytes(storage):
    size = 4 * MiB
    storage.create_disk("d", size)
    rng = random.Random(3)
    model = bytearray(size)
    for offset, data in random_aligned_writes(rng, model, 20):
        storage.write_disk("d", offset, data)
    s1 = storage.snapshot_disk("d")
    h1 = sha(model)
    for offset, data in random_aligned_writes(rng, model, 20):
        storage.write_disk("d", offset, data)
    s2 = storage.snapshot_disk("d")
    h2 = sha(model)
    for offset, data in random_aligned_writes(rng, model, 20):
        storage.write_disk("d", offset, data)
    storage.write_disk("d", 0, bytes(size))  # a whole-disk overwrite after the snapshots
    model[:] = bytes(size)

    assert storage.list_snapshots("d") == [s1, s2]
    assert disk_sha(storage, "d", s1) == h1
    assert disk_sha(storage, "d", s2) == h2
    assert disk_sha(storage, "d") == sha(model)

    storage.delete_snapshot("d", s1)
    storage.delete_snapshot("d", s1)  # deleting twice is fine
    assert storage.list_snapshots("d") == [s2]
    assert disk_sha(storage, "d", s2) == h2
    with pytest.raises(SnapshotNotFound):
        storage.read_disk("d", 0, 512, snapshot=s1)
    s3 = storage.snapshot_disk("d")
    assert storage.list_snapshots("d") == [s2, s3]
    assert disk_sha(storage, "d", s3) == sha(model)


def test_resize_keeps_data_and_snapshots(storage):
    storage.create_disk("r", 2 * MiB)
    data = random.Random(4).randbytes(2 * MiB)
    storage.write_disk("r", 0, data)
    before = storage.snapshot_disk("r")

    storage.resize_disk("r", 3 * MiB + 512)
    assert storage.disk_size("r") == 3 * MiB + 512
    assert storage.read_disk("r", 0, 2 * MiB) == data
    assert storage.read_disk("r", 2 * MiB, MiB + 512) == bytes(MiB + 512)

    storage.resize_disk("r", MiB + 512)  # shrink into the middle of a chunk ...
    storage.resize_disk("r", 2 * MiB)  # ... and grow: the cut-off bytes read as zeros
    assert storage.read_disk("r", 0, MiB + 512) == data[: MiB + 512]
    assert storage.read_disk("r", MiB + 512, MiB - 512) == bytes(MiB - 512)

    assert storage.disk_size("r", snapshot=before) == 2 * MiB
    assert storage.read_disk("r", 0, 2 * MiB, snapshot=before) == data


def test_delete_disk_removes_its_snapshots(storage):
    storage.create_disk("gone", MiB)
    storage.write_disk("gone", 0, b"\x07" * MiB)
    storage.snapshot_disk("gone")
    storage.delete_disk("gone")
    storage.delete_disk("gone")  # deleting twice is fine
    assert not storage.disk_exists("gone")
    with pytest.raises(DiskNotFound):
        storage.list_snapshots("gone")
    storage.create_disk("gone", MiB)
    assert storage.list_snapshots("gone") == []
    assert storage.read_disk("gone", 0, MiB) == bytes(MiB)


def test_used_bytes_grows_with_changes_and_drops_on_delete(storage):
    storage.create_disk("u-0", 4 * MiB)
    base = storage.used_bytes("u-")
    storage.write_disk("u-0", 0, random.Random(5).randbytes(2 * MiB))
    storage.flush_disk("u-0")
    written = storage.used_bytes("u-")
    assert written - base >= 2 * MiB
    snap = storage.snapshot_disk("u-0")
    storage.write_disk("u-0", 0, random.Random(6).randbytes(2 * MiB))
    storage.flush_disk("u-0")
    with_snapshot = storage.used_bytes("u-")
    assert with_snapshot - written >= 2 * MiB  # the snapshot keeps the old 2 MiB
    storage.delete_snapshot("u-0", snap)
    assert storage.used_bytes("u-") <= with_snapshot - 2 * MiB
    storage.put_object("u-objects/x", b"y" * 10000)
    assert storage.used_bytes("u-objects/") >= 10000
    assert storage.used_bytes("zzz") == 0
    storage.delete_disk("u-0")
    assert storage.used_bytes("u-0") == 0


def test_open_storage_config_errors(tmp_path):
    with pytest.raises(InvalidRequest, match="unknown storage kind"):
        open_storage({"kind": "s3"})
    with pytest.raises(InvalidRequest, match="root"):
        open_storage({"kind": "local"})
    with pytest.raises(InvalidRequest, match="connection_string"):
        open_storage({"kind": "azure", "container": "x"})
    assert isinstance(open_storage({"root": str(tmp_path)}), LocalStorage)  # local is the default


# -- local copy-on-write --------------------------------------------------------------------


def test_local_snapshots_cost_changed_chunks_not_copies(tmp_path):
    s = LocalStorage(str(tmp_path))
    size = 16 * MiB
    s.create_disk("cow", size)
    rng = random.Random(7)
    s.write_disk("cow", 0, rng.randbytes(size))
    s.flush_disk("cow")
    base = s.used_bytes("cow")
    assert size <= base < size + 256 * 1024

    hashes = {}
    model = bytearray(s.read_disk("cow", 0, size))
    for i in range(40):
        off = rng.randrange(0, size // 4096) * 4096
        data = rng.randbytes(4096)
        model[off : off + 4096] = data
        s.write_disk("cow", off, data)
        hashes[s.snapshot_disk("cow")] = sha(model)
    grown = s.used_bytes("cow") - base
    # Each small write copied at most one 1 MiB chunk; 40 full copies would be 640 MiB.
    assert grown <= 40 * (MiB + 16 * 1024), grown
    for sid, h in hashes.items():
        assert disk_sha(s, "cow", sid) == h

    for sid in list(hashes):
        s.delete_snapshot("cow", sid)
    assert s.used_bytes("cow") <= base + 64 * 1024
    assert len(list(s.chunk_files("cow"))) == size // MiB
    assert disk_sha(s, "cow") == sha(model)


def test_local_delete_frees_exactly_the_unshared_chunk_versions(tmp_path):
    s = LocalStorage(str(tmp_path), chunk_bytes=MiB)
    s.create_disk("x", 4 * MiB)
    rng = random.Random(8)
    model = bytearray(rng.randbytes(4 * MiB))
    s.write_disk("x", 0, model)  # chunk versions 0:1 1:2 2:3 3:4

    def write(chunk: int) -> None:
        data = rng.randbytes(4096)
        at = chunk * MiB + 8192
        model[at : at + 4096] = data
        s.write_disk("x", at, data)

    a, ha = s.snapshot_disk("x"), sha(model)
    write(0)  # 0:5
    b, hb = s.snapshot_disk("x"), sha(model)
    write(0)  # 0:6
    write(1)  # 1:7
    c, hc = s.snapshot_disk("x"), sha(model)
    write(2)  # 2:8, live only
    s.flush_disk("x")
    assert len(list(s.chunk_files("x"))) == 8

    s.delete_snapshot("x", b)  # 0:5 was b's alone
    assert len(list(s.chunk_files("x"))) == 7
    assert (disk_sha(s, "x", a), disk_sha(s, "x", c)) == (ha, hc)
    s.delete_snapshot("x", a)  # 0:1 and 1:2 were a's alone; 2:3 and 3:4 are c's too
    assert len(list(s.chunk_files("x"))) == 5
    assert disk_sha(s, "x", c) == hc
    s.delete_snapshot("x", c)  # 2:3 was c's alone now; the rest is live
    assert sorted(os.path.basename(p) for p in s.chunk_files("x")) == ["0.6", "1.7", "2.8", "3.4"]
    assert disk_sha(s, "x") == sha(model)
    assert hb != hc


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "no-direct-io"])
def test_local_whole_chunks_and_pieces_mix_exactly(tmp_path, monkeypatch, direct):
    """Whole new chunks go to the device with O_DIRECT, everything else through the page
    cache: interleaved with partial writes to the same chunks and snapshots between them,
    every snapshot and the live disk still read back exactly. Where the file system refuses
    direct I/O the writes fall back to the page cache."""
    if not direct:
        refuse_direct_io(monkeypatch)
    cb = 64 * 1024
    s = LocalStorage(str(tmp_path), chunk_bytes=cb)
    size = 40 * cb + 8192  # a last, partial chunk too
    s.create_disk("d", size)
    model = bytearray(size)
    rng = random.Random(21)
    expected = {}
    for round_ in range(6):
        for _ in range(30):
            if rng.random() < 0.5:  # whole chunks, one or several at once
                first, count = rng.randrange(0, 40), rng.randint(1, 3)
                count = min(count, 40 - first)
                offset, data = first * cb, rng.randbytes(count * cb)
            else:
                length = rng.randint(1, 200) * 512
                offset = rng.randrange(0, (size - length) // 512 + 1) * 512
                data = rng.randbytes(length)
            s.write_disk("d", offset, data)
            model[offset : offset + len(data)] = data
        if round_ % 2:
            s.flush_disk("d")
        expected[s.snapshot_disk("d")] = sha(model)
    handle = s._disks["d"]
    assert handle.direct_ok is direct and bool(handle.direct_bufs) is direct
    assert disk_sha(s, "d") == sha(model)
    for sid, digest in expected.items():
        assert disk_sha(s, "d", sid) == digest
    fresh = LocalStorage(str(tmp_path), chunk_bytes=cb)  # what is durable, read by another handle
    assert disk_sha(fresh, "d") == sha(model)


def test_local_a_failed_background_chunk_write_fails_the_flush_and_nothing_durable_changes(tmp_path, monkeypatch):
    """Whole chunks are written by background writers: one that fails is reported by the
    next flush, which then writes no map, so the durable disk is still the last flushed one;
    writing the same bytes again (the apply engine replays its logs) repairs it."""
    import threading

    from replication.dataplane.storage import StorageError
    from replication.dataplane.storage import local_disk

    cb = 64 * 1024
    s = LocalStorage(str(tmp_path), chunk_bytes=cb)
    s.create_disk("d", 8 * cb)
    s.write_disk("d", 0, b"\1" * (8 * cb))
    s.flush_disk("d")
    assert s._disks["d"].direct_ok, "the test's file system must take direct I/O"
    real_write_all = local_disk.write_all

    def failing_in_the_background(fd, data, offset=None):
        if threading.current_thread().name.startswith("storage-writer"):
            raise OSError(errno.EIO, "Input/output error")
        return real_write_all(fd, data, offset)

    monkeypatch.setattr(local_disk, "write_all", failing_in_the_background)
    s.snapshot_disk("d")  # pinned: the next whole-chunk writes make new chunk versions
    s.write_disk("d", 2 * cb, b"\2" * (2 * cb))  # accepted: the failure comes later
    with pytest.raises(StorageError, match="writing a chunk failed"):
        s.flush_disk("d")
    assert disk_sha(LocalStorage(str(tmp_path), chunk_bytes=cb), "d") == sha(b"\1" * (8 * cb))
    monkeypatch.setattr(local_disk, "write_all", real_write_all)
    s.write_disk("d", 2 * cb, b"\2" * (2 * cb))
    s.flush_disk("d")
    expected = b"\1" * (2 * cb) + b"\2" * (2 * cb) + b"\1" * (4 * cb)
    assert disk_sha(s, "d") == sha(expected)
    assert disk_sha(LocalStorage(str(tmp_path), chunk_bytes=cb), "d") == sha(expected)


def test_local_state_is_shared_between_handles(tmp_path):
    """A second handle (another process) sees what the first flushed and snapshotted."""
    w = LocalStorage(str(tmp_path))
    r = LocalStorage(str(tmp_path))
    w.create_disk("shared", 2 * MiB)
    assert r.read_disk("shared", 0, 512) == bytes(512)
    w.write_disk("shared", 0, b"\x01" * MiB)
    sid = w.snapshot_disk("shared")
    w.write_disk("shared", 0, b"\x02" * 512)
    w.flush_disk("shared")
    assert r.read_disk("shared", 0, 1024) == b"\x02" * 512 + b"\x01" * 512
    assert r.read_disk("shared", 0, 512, snapshot=sid) == b"\x01" * 512
    assert r.list_snapshots("shared") == [sid]


def test_local_writer_handoff_respects_snapshots_taken_elsewhere(tmp_path):
    """A long-lived handle (a worker) must notice a snapshot another process took since it
    last looked, and copy-on-write instead of overwriting the pinned chunk in place."""
    worker_a = LocalStorage(str(tmp_path))
    worker_a.create_disk("h", 2 * MiB)
    worker_a.write_disk("h", 0, b"\x01" * (2 * MiB))
    worker_a.flush_disk("h")
    assert worker_a.read_disk("h", 0, 512) == b"\x01" * 512  # a's handle is loaded and clean

    worker_b = LocalStorage(str(tmp_path))
    sid = worker_b.snapshot_disk("h")  # no data changed: only the pinned set did
    worker_b.close()

    worker_a.write_disk("h", 4096, b"\x02" * 4096)
    worker_a.flush_disk("h")
    assert worker_a.read_disk("h", 0, 2 * MiB, snapshot=sid) == b"\x01" * (2 * MiB)
    assert worker_a.read_disk("h", 4096, 4096) == b"\x02" * 4096

    worker_c = LocalStorage(str(tmp_path))
    worker_c.delete_snapshot("h", sid)
    with pytest.raises(SnapshotNotFound):  # a's cached snapshot map does not outlive the snapshot
        worker_a.read_disk("h", 0, 512, snapshot=sid)


def test_local_reader_never_cleans_up_under_a_live_writer(tmp_path):
    """A process reading a point (a test failover) while the apply engine writes must not
    mistake the writer's in-progress chunk versions for a dead writer's leftovers."""
    writer = LocalStorage(str(tmp_path))
    writer.create_disk("rw", 4 * MiB)
    writer.write_disk("rw", 0, b"\x0a" * (4 * MiB))
    sid = writer.snapshot_disk("rw")
    writer.write_disk("rw", 0, b"\x0b" * (2 * MiB))  # new chunk versions, not yet flushed
    assert os.path.exists(tmp_path / "disks" / "rw" / "ALLOCATING")

    reader = LocalStorage(str(tmp_path))
    assert reader.read_disk("rw", 0, 4 * MiB, snapshot=sid) == b"\x0a" * (4 * MiB)
    assert reader.list_snapshots("rw") == [sid] and reader.disk_size("rw") == 4 * MiB

    writer.flush_disk("rw")
    want = b"\x0b" * (2 * MiB) + b"\x0a" * (2 * MiB)
    assert writer.read_disk("rw", 0, 4 * MiB) == want
    assert LocalStorage(str(tmp_path)).read_disk("rw", 0, 4 * MiB) == want
    assert reader.read_disk("rw", 0, 4 * MiB) == want  # and the reader catches up


_WRITER = r"""
import json, os, random, sys, hashlib
sys.path.insert(0, sys.argv[1])
from replication.dataplane.storage.local import LocalStorage
root, seed = sys.argv[2], int(sys.argv[3])
s = LocalStorage(root, chunk_bytes=256 * 1024)
size = 4 * 1024 * 1024
if s.disk_size("k") != size:  # killed between the two resizes below
    s.resize_disk("k", size)
model = bytearray(s.read_disk("k", 0, size))
rng = random.Random(seed)
ledger = os.open(os.path.join(root, "ledger.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
print("ready", flush=True)
while True:
    for _ in range(rng.randint(1, 8)):
        n = rng.randint(1, 700) * 512
        off = rng.randrange(0, (size - n) // 512 + 1) * 512
        data = rng.randbytes(n)
        model[off:off + n] = data
        s.write_disk("k", off, data)
    if rng.random() < 0.5:
        sid = s.snapshot_disk("k")
        os.write(ledger, (json.dumps({"sid": sid, "sha": hashlib.sha256(model).hexdigest()}) + "\n").encode())
        os.fsync(ledger)
    snaps = s.list_snapshots("k")
    if len(snaps) > 6:
        s.delete_snapshot("k", snaps[rng.randrange(len(snaps) - 1)])
    if rng.random() < 0.1:
        s.resize_disk("k", size - 512 * rng.randint(1, 2000))
        s.resize_disk("k", size)
        model = bytearray(s.read_disk("k", 0, size))
"""


def test_local_sigkill_never_corrupts_a_snapshot(tmp_path):
    """Kill a writer that writes, snapshots, deletes snapshots and resizes, at random
    moments: every snapshot left is byte-exact and no chunk file is leaked."""
    root = str(tmp_path / "st")
    s = LocalStorage(root, chunk_bytes=256 * 1024)
    s.create_disk("k", 4 * MiB)
    s.close()
    rng = random.Random(9)
    ledger = {}
    killed_busy = 0
    for round_ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, REPO, root, str(round_)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.02, 0.4))
        if proc.poll() is None:
            killed_busy += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()

        check = LocalStorage(root)  # a fresh process's view, recovering what the kill left
        with open(os.path.join(root, "ledger.jsonl")) as f:
            for line in f:
                if line.endswith("\n"):
                    entry = json.loads(line)
                    ledger[entry["sid"]] = entry["sha"]
        for sid in check.list_snapshots("k"):
            if sid in ledger:
                assert disk_sha(check, "k", sid) == ledger[sid], f"snapshot {sid} changed (round {round_})"
        check.close()
    assert killed_busy >= 10

    # After recovery nothing is leaked: with every snapshot gone, only live chunks remain.
    s = LocalStorage(root)
    for sid in s.list_snapshots("k"):
        s.delete_snapshot("k", sid)
    chunk_files = [os.path.basename(p) for p in s.chunk_files("k")]
    assert len(chunk_files) == len({name.split(".")[0] for name in chunk_files}) <= 16
    assert not os.path.exists(os.path.join(root, "disks", "k", "ALLOCATING"))


def test_local_prepared_writes_copy_pinned_and_shared_chunks_as_single_writes_do(tmp_path):
    """``prepare_writes`` makes the new chunk versions a batch's writes need several at once
    (what a resync's apply does): the snapshot, a clone sharing the chunk files and the
    live disk read exactly as if each write had copied its chunk itself, and a handle
    dropped before its flush leaves the durable disk as it was, its files collected."""
    root = str(tmp_path)
    s = LocalStorage(root, chunk_bytes=MiB)
    size = 8 * MiB + 12288  # the last chunk is short
    s.create_disk("p", size)
    rng = random.Random(21)
    model = bytearray(size)
    model[: 6 * MiB] = rng.randbytes(6 * MiB)  # chunks 6 to 8 never written
    s.write_disk("p", 0, bytes(model[: 6 * MiB]))
    s.flush_disk("p")
    sid = s.snapshot_disk("p")
    s.clone_disk_at("p", snapshot=sid, dest_name="c")
    before = bytes(model)
    writes = [(8192, 4096), (MiB + 4096, 8192), (2 * MiB, MiB), (4 * MiB - 4096, 8192), (7 * MiB + 512, 4096),
              (8 * MiB + 4096, 8192), (3 * MiB + 65536, 4096)]
    s.prepare_writes("p", [*writes, (size, 4096), (-4096, 4096)])  # extents outside the disk are left alone
    for off, n in writes:
        data = rng.randbytes(n)
        model[off : off + n] = data
        s.write_disk("p", off, data)
    s.flush_disk("p")
    assert s.read_disk("p", 0, size) == bytes(model)
    assert s.read_disk("p", 0, size, snapshot=sid) == before
    assert s.read_disk("c", 0, size) == before
    s.write_disk("c", 8192, b"c" * 4096)  # the clone copies what it shares too
    s.flush_disk("c")
    assert s.read_disk("p", 0, size) == bytes(model)
    assert s.read_disk("p", 0, size, snapshot=sid) == before
    sid2 = s.snapshot_disk("p")
    durable = sorted(s.chunk_files("p"))

    # prepared but never flushed: a crash. The durable disk is as it was; its files go.
    s.prepare_writes("p", [(MiB, 4096), (5 * MiB, 4096), (8 * MiB, 4096)])
    assert len(list(s.chunk_files("p"))) > len(durable)
    other = LocalStorage(root, chunk_bytes=MiB)
    assert other.read_disk("p", 0, size) == bytes(model)
    other.write_disk("p", 0, bytes(model[:4096]))  # the writer finishes what the crash left
    other.flush_disk("p")
    made = set(other.chunk_files("p")) - set(durable)  # only the version that write made
    assert set(durable) <= set(other.chunk_files("p")) and len(made) == 1
    assert os.path.basename(made.pop()).startswith("0.")
    assert other.read_disk("p", 0, size) == bytes(model)
    assert other.read_disk("p", 0, size, snapshot=sid) == before
    assert other.read_disk("p", 0, size, snapshot=sid2) == bytes(model)
