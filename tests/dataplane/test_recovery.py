"""Recovery on the data plane, against real storage (local directory and Azurite): digests of
recovery points equal to the plain byte image, sparse exports, copy-on-write clones of a
snapshot (hard links locally, a server-side page-blob copy on Azure), and bad requests."""
from __future__ import annotations

import os
import random

import pytest
from blake3 import blake3

from replication.dataplane import batch as wire
from replication.dataplane.apply import PointNotFound
from replication.dataplane.recovery import (
    DiskDigest,
    RecoveryDisk,
    VerificationFailed,
    check_digest,
    point_disk_digests,
    recovery_disks,
)
from replication.dataplane.storage import DiskExists, InvalidRequest, SnapshotNotFound, Storage
from replication.dataplane.storage.base import digest_flat_file
from replication.dataplane.storage.local import LocalStorage

try:
    from tests.dataplane.azurite import azurite, storage  # noqa: F401 - fixtures
    from tests.dataplane.test_apply import Source
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from azurite import azurite, storage  # type: ignore[no-redef]  # noqa: F401
    from test_apply import Source  # type: ignore[no-redef]

MiB = 1024 * 1024


def plain_digest(data: bytes | bytearray) -> str:
    return "blake3:" + blake3(bytes(data)).hexdigest()


class RecordingSource(Source):
    """A Source that keeps every disk's bytes after each batch, to compare points with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images: dict[int, dict[int, bytes]] = {}

    def send(self, writes, **kwargs) -> int:
        seq = super().send(writes, **kwargs)
        self.images[seq] = {i: bytes(d) for i, d in self.disks.items()}
        return seq


def sparse_replica(storage: Storage, *, seed: int = 1, points: int = 3) -> tuple[RecordingSource, object]:
    """A replica with real sealed logs applied: an initial copy that leaves whole chunks and
    parts of chunks unwritten (holes), then rounds of random writes, each round a point."""
    source = RecordingSource(storage, {0: 5 * MiB + 1536, 1: 3 * MiB}, seed=seed)
    applier = source.applier()
    rng = random.Random(seed)
    # Initial copy: disk 0 gets its first MiB, a few sectors in chunk 3 and its odd tail;
    # chunks 1, 2 and 4 are never written. Disk 1 gets one range in the middle.
    source.send([(0, 0, rng.randbytes(MiB)), (0, 3 * MiB + 4096, rng.randbytes(8192))],
                flags=wire.FLAG_INITIAL, dt_s=0.1)
    source.send([(0, 5 * MiB, rng.randbytes(1536)), (1, MiB + 512, rng.randbytes(64 * 1024))],
                flags=wire.FLAG_INITIAL | wire.FLAG_INITIAL_DONE, dt_s=0.1)
    assert applier.apply_pending(crash_consistent_interval_s=1).ok
    for _ in range(points - 1):
        writes = [(0, rng.randrange(0, MiB // 512) * 512, rng.randbytes(4096)),
                  (1, rng.randrange(0, 2 * MiB // 512) * 512, rng.randbytes(2048))]
        source.send(writes, dt_s=10)
        assert applier.apply_pending(crash_consistent_interval_s=1).ok
    assert len(applier.list_points()) == points
    return source, applier


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


# -- digests ------------------------------------------------------------------------------------


def test_point_digests_equal_the_digest_of_the_plain_image_at_every_point(storage):
    source, applier = sparse_replica(storage)
    points = applier.list_points()
    seen = set()
    for p in points:
        digests = point_disk_digests(applier, p.point_id)
        assert sorted(digests) == [0, 1]
        for i, d in digests.items():
            image = source.images[p.seq][i]
            assert d == DiskDigest(index=i, size_bytes=len(image), digest=plain_digest(image))
            seen.add(d.digest)
        disks = recovery_disks(applier, p.point_id, digests)
        assert [(d.index, d.disk_name, d.snapshot, d.expected) for d in disks] == [
            (i, source.disk_specs()[i][0], p.snapshots[i], digests[i]) for i in (0, 1)
        ]
    assert len(seen) == 2 * len(points)  # every point of every disk differs
    # The live disk's digest is the latest image's.
    assert storage.disk_digest(source.disk_specs()[0][0]) == plain_digest(source.disks[0])


def test_digest_of_a_disk_never_written_is_the_digest_of_zeros(storage):
    storage.create_disk("empty", 3 * MiB + 512)
    sid = storage.snapshot_disk("empty")
    assert storage.disk_digest("empty", snapshot=sid) == plain_digest(bytes(3 * MiB + 512))


def test_digests_of_a_missing_point_or_snapshot_are_refused(storage):
    source, applier = sparse_replica(storage, points=1)
    with pytest.raises(PointNotFound):
        point_disk_digests(applier, "no-such-point")
    name = source.disk_specs()[0][0]
    with pytest.raises(SnapshotNotFound):
        storage.disk_digest(name, snapshot="00000000000000000001" if isinstance(storage, LocalStorage)
                            else "2020-01-01T00:00:00.0000000Z")


# -- exports --------------------------------------------------------------------------------------


def test_export_writes_the_points_bytes_into_a_sparse_flat_file(storage, tmp_path):
    source, applier = sparse_replica(storage)
    for p in applier.list_points():
        for i in (0, 1):
            name = source.disk_specs()[i][0]
            path = str(tmp_path / f"{p.point_id}-{i}.img")
            result = storage.export_disk_at(name, snapshot=p.snapshots[i], path=path)
            image = source.images[p.seq][i]
            with open(path, "rb") as f:
                assert f.read() == image
            assert result.size_bytes == len(image) == os.path.getsize(path)
            assert digest_flat_file(path) == plain_digest(image)
            # Only what was written takes space: far less than the disk.
            assert result.copied_bytes < len(image) // 2
            assert allocated(path) < len(image) // 2
            if isinstance(storage, LocalStorage):
                assert result.method in ("clone", "sparse-copy")


def test_export_refuses_an_existing_file_and_leaves_nothing_on_a_missing_snapshot(storage, tmp_path):
    source, applier = sparse_replica(storage, points=1)
    point = applier.list_points()[0]
    name = source.disk_specs()[0][0]
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "taken.img"
    existing.write_bytes(b"keep me")
    with pytest.raises(InvalidRequest, match="already exists"):
        storage.export_disk_at(name, snapshot=point.snapshots[0], path=str(existing))
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InvalidRequest, match="directory does not exist"):
        storage.export_disk_at(name, snapshot=point.snapshots[0], path=str(out / "no" / "x.img"))
    storage.delete_snapshot(name, point.snapshots[0])
    with pytest.raises(SnapshotNotFound):
        storage.export_disk_at(name, snapshot=point.snapshots[0], path=str(out / "gone.img"))
    assert sorted(os.listdir(out)) == ["taken.img"]


def test_digest_of_a_flat_file_counts_a_short_file_as_zeros_and_refuses_a_long_one(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(b"\x01" * 1000)
    assert digest_flat_file(str(path), 4096) == plain_digest(b"\x01" * 1000 + bytes(3096))
    with pytest.raises(InvalidRequest):
        digest_flat_file(str(path), 512)


# -- clones ----------------------------------------------------------------------------------------


def read_all(storage: Storage, name: str, snapshot: str | None = None) -> bytes:
    return b"".join(storage.iter_disk(name, snapshot=snapshot))


def test_clone_holds_the_snapshot_and_is_independent_of_the_replica(storage):
    """Later writes to the replica never reach the clone and vice versa; nor does deleting
    the snapshot (which lowers the local storage's copy-on-write watermark) or the replica."""
    source, applier = sparse_replica(storage, points=2)
    first = applier.list_points()[0]
    name = source.disk_specs()[0][0]
    image = source.images[first.seq][0]
    method = storage.clone_disk_at(name, snapshot=first.snapshots[0], dest_name="clone-0")
    assert method == ("clone" if isinstance(storage, LocalStorage) else "server-copy")
    assert read_all(storage, "clone-0") == image
    assert storage.list_snapshots("clone-0") == []
    assert storage.disk_digest("clone-0") == plain_digest(image)

    # The snapshot goes (its chunk versions were only pinned by it), then the replica is
    # written everywhere the clone has data, through the apply engine.
    applier.prune_points(older_than_ns=first.source_time_ns + 1)
    assert [p.point_id for p in applier.list_points()] != [first.point_id]
    rng = random.Random(5)
    writes = [(0, off, rng.randbytes(4096)) for off in (0, 512 * 1024, 3 * MiB + 4096, 5 * MiB)]
    writes[-1] = (0, 5 * MiB, rng.randbytes(1536))
    source.send(writes, dt_s=10)
    assert applier.apply_pending(crash_consistent_interval_s=1).ok
    assert read_all(storage, "clone-0") == image
    assert read_all(storage, name) == bytes(source.disks[0])

    # Writes to the clone never reach the replica or its remaining snapshot.
    latest = applier.list_points()[-1]
    clone_image = bytearray(image)
    for off in (0, MiB - 4096, 3 * MiB + 4096):
        data = rng.randbytes(4096)
        storage.write_disk("clone-0", off, data)
        clone_image[off : off + 4096] = data
    storage.write_disk("clone-0", 2 * MiB, rng.randbytes(MiB))  # a whole chunk never written before
    clone_image[2 * MiB : 3 * MiB] = read_all(storage, "clone-0")[2 * MiB : 3 * MiB]
    storage.flush_disk("clone-0")
    assert read_all(storage, "clone-0") == bytes(clone_image)
    assert read_all(storage, name) == bytes(source.disks[0])
    assert read_all(storage, name, latest.snapshots[0]) == source.images[latest.seq][0]

    # A fresh handle (another process) sees the same; deleting the replica leaves the clone.
    if isinstance(storage, LocalStorage):
        other = LocalStorage(storage.root)
        assert read_all(other, "clone-0") == bytes(clone_image)
        assert read_all(other, name) == bytes(source.disks[0])
        other.close()
    applier.delete_replica()
    assert read_all(storage, "clone-0") == bytes(clone_image)


def test_local_clone_shares_chunk_files_until_one_side_writes(tmp_path):
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=1)
    point = applier.list_points()[0]
    name = source.disk_specs()[0][0]
    storage.clone_disk_at(name, snapshot=point.snapshots[0], dest_name="clone-0")
    shared = sorted(storage.chunk_files("clone-0"))
    assert shared and all(os.stat(p).st_nlink == 2 for p in shared)
    # Dropping the only point's snapshot lowers the watermark to nothing: the replica's live
    # chunk versions are still shared and must be copied, not written in place.
    storage.delete_snapshot(name, point.snapshots[0])
    storage.write_disk(name, 0, b"\x07" * 512)
    storage.flush_disk(name)
    assert read_all(storage, "clone-0") == source.images[point.seq][0]
    chunk0 = [p for p in shared if os.path.basename(p).startswith("0.")][0]
    assert os.stat(chunk0).st_nlink == 1  # the replica let go of its link after copying
    # Now the clone owns that file alone and writes it in place; the replica is untouched.
    storage.write_disk("clone-0", 0, b"\x08" * 512)
    storage.flush_disk("clone-0")
    assert read_all(storage, "clone-0")[:513] == b"\x08" * 512 + source.images[point.seq][0][512:513]
    assert read_all(storage, name)[:512] == b"\x07" * 512
    storage.close()


def test_clone_refuses_a_taken_name_a_bad_name_and_a_missing_snapshot(storage):
    source, applier = sparse_replica(storage, points=1)
    point = applier.list_points()[0]
    name = source.disk_specs()[0][0]
    storage.create_disk("taken", 1024)
    storage.write_disk("taken", 0, b"\x05" * 1024)
    with pytest.raises(DiskExists):
        storage.clone_disk_at(name, snapshot=point.snapshots[0], dest_name="taken")
    assert read_all(storage, "taken") == b"\x05" * 1024
    with pytest.raises(InvalidRequest):
        storage.clone_disk_at(name, snapshot=point.snapshots[0], dest_name="../escape")
    storage.delete_snapshot(name, point.snapshots[0])
    with pytest.raises(SnapshotNotFound):
        storage.clone_disk_at(name, snapshot=point.snapshots[0], dest_name="clone-1")
    assert not storage.disk_exists("clone-1")


# -- verification ------------------------------------------------------------------------------------


def test_a_recovery_disk_must_carry_its_own_digest_and_a_mismatch_names_everything(tmp_path):
    storage = LocalStorage(str(tmp_path / "s"))
    good = DiskDigest(index=0, size_bytes=4096, digest=plain_digest(bytes(4096)))
    disk = RecoveryDisk(index=0, size_bytes=4096, storage=storage, disk_name="d", snapshot="s", expected=good)
    check_digest(vm="vm-1", disk=disk, actual=good.digest)
    with pytest.raises(VerificationFailed) as err:
        check_digest(vm="vm-1", disk=disk, actual="blake3:00", location="/x/2000.img")
    text = str(err.value)
    assert "'vm-1'" in text and "Disk 0" in text and good.digest in text and "blake3:00" in text and "/x/2000.img" in text
    with pytest.raises(ValueError):
        RecoveryDisk(index=1, size_bytes=4096, storage=storage, disk_name="d", snapshot="s", expected=good)
    with pytest.raises(ValueError):
        RecoveryDisk(index=0, size_bytes=4096, storage=storage, disk_name="d", snapshot="s",
                     expected=DiskDigest(index=0, size_bytes=4096, digest="sha256:00"))
    storage.close()
