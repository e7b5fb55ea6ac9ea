"""Disks that change shape in the apply engine, against real storage (local directory and
Azurite page blobs): a disk record grows a replica disk, adds one, or retires one at its point
of the stream; points before the change keep the old size and bytes; writes past a disk's
end in force are rejected; a replay after a crash gives the same disks."""
from __future__ import annotations

import hashlib

from replication.dataplane import batch as wire
from replication.dataplane.apply import ReplicaApplier
from replication.dataplane.sealing import seal

try:
    from tests.dataplane.azurite import azurite, storage, storage_config  # noqa: F401 - fixtures
    from tests.dataplane.test_apply import Source
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from azurite import azurite, storage, storage_config  # type: ignore[no-redef]  # noqa: F401
    from test_apply import Source  # type: ignore[no-redef]

MiB = 1024 * 1024


class ShapedSource(Source):
    """A source whose disks may grow, join and leave, announced in its stream."""

    def resize(self, disk: int, size: int) -> int:
        """Announce disk ``disk`` at ``size`` bytes (0: it left), in a batch of its own."""
        if size == 0:
            self.disks.pop(disk)
        else:
            old = self.disks.get(disk, bytearray())
            self.disks[disk] = bytearray(old[:size]) + bytearray(max(0, size - len(old)))
        self.seq += 1
        self.time_ns += 1_000_000_000
        raw = wire.encode(item_id=self.item_id, seq=self.seq, source_time_ns=self.time_ns,
                          records=[wire.Record(wire.KIND_DISK, disk, size, b"")])
        sealed = seal(raw, key=self.key, context=f"{self.item_id}:{self.seq}".encode())
        self.sealed[self.seq] = sealed
        self.meta[self.seq] = (self.time_ns, 0, None)
        self.storage.put_object(self.log_key(self.seq), sealed)
        self.hashes[self.seq] = {i: hashlib.sha256(d).hexdigest() for i, d in self.disks.items()}
        return self.seq


def applier_for(src: ShapedSource, names: dict[int, int]) -> ReplicaApplier:
    """The applier as the vault builds it: every replica disk it knows, at the size it knows."""
    return ReplicaApplier(src.storage, key=src.key, item_id=src.item_id,
                          disks={i: (f"rep-{src.item_id.hex[:12]}-{i}", size) for i, size in names.items()})


def image(applier: ReplicaApplier, point_id: str, disk: int) -> bytes:
    return b"".join(applier.iter_disk_image(point_id, disk))


def test_a_disk_grows_joins_and_leaves_at_its_point_of_the_stream(storage):  # noqa: F811 - fixture
    src = ShapedSource(storage, {0: 2 * MiB, 1: MiB}, seed=5)
    src.initial_copy()
    src.send(src.random_writes(20))
    a = applier_for(src, {0: 2 * MiB, 1: MiB})
    before = a.apply_pending(crash_consistent_interval_s=0).new_points[-1]
    old0, old1 = bytes(src.disks[0]), bytes(src.disks[1])

    # disk 0 grows to 3 MiB and is written past its old end; disk 2 joins; disk 1 leaves
    announced = [src.resize(0, 3 * MiB)]
    src.send([(0, 2 * MiB + 4096, b"\x5a" * 8192)])
    announced.append(src.resize(2, MiB))
    src.send([(2, 0, b"\xa5" * MiB)] + src.random_writes(10))
    announced.append(src.resize(1, 0))
    src.send([(0, 0, b"\x11" * 4096)])
    # the vault knows disk 2 by now (its DiskSpec); its size there is what it saw
    result = applier_for(src, {0: 2 * MiB, 1: MiB, 2: MiB}).apply_pending(crash_consistent_interval_s=0)
    assert result.ok, result.errors
    a = applier_for(src, {0: 2 * MiB, 1: MiB, 2: MiB})
    after = a.list_points()[-1]
    assert set(after.snapshots) == {0, 2} and after.disk_sizes == {0: 3 * MiB, 2: MiB}
    assert image(a, after.point_id, 0) == bytes(src.disks[0]) and image(a, after.point_id, 2) == bytes(src.disks[2])
    assert a.disk_sizes() == {0: 3 * MiB, 2: MiB}
    # a batch of disk records alone cuts no point
    assert not {p.seq for p in a.list_points()} & set(announced)

    # the point from before: old sizes, old bytes, and the disk that left since
    assert before.disk_sizes == {0: 2 * MiB, 1: MiB}
    assert a.disk_size_at(before.point_id, 0) == 2 * MiB
    assert image(a, before.point_id, 0) == old0 and image(a, before.point_id, 1) == old1

    # pruning the old point deletes the retired disk's snapshot too
    a.delete_points([before.point_id])
    assert a.list_points()[0].point_id != before.point_id


def test_a_write_past_the_end_in_force_is_rejected_and_nothing_of_it_applied(storage):  # noqa: F811 - fixture
    src = ShapedSource(storage, {0: MiB}, seed=6)
    src.initial_copy()
    a = applier_for(src, {0: MiB})
    a.apply_pending(crash_consistent_interval_s=0)
    # the vault learned of the growth (the database says 2 MiB), the stream did not announce it
    src.disks[0] += bytearray(MiB)
    bad = src.send([(0, MiB, b"\x01" * 4096)])
    result = applier_for(src, {0: 2 * MiB}).apply_pending(crash_consistent_interval_s=0)
    assert [e.seq for e in result.errors] == [bad] and "past its 1048576 bytes" in result.errors[0].message
    assert a.disk_sizes() == {0: MiB} and storage.disk_size(a.disks[0].name) == MiB


def test_a_replay_after_a_resize_that_was_not_checkpointed_gives_the_same_disk(storage):  # noqa: F811 - fixture
    src = ShapedSource(storage, {0: MiB}, seed=7)
    src.initial_copy()
    a = applier_for(src, {0: MiB})
    a.apply_pending(crash_consistent_interval_s=0)
    src.resize(0, 2 * MiB)
    src.send([(0, MiB + 512, b"\x33" * 4096)])
    # a crash after the resize reached storage but before the state said so
    storage.resize_disk(a.disks[0].name, 2 * MiB)
    storage.write_disk(a.disks[0].name, MiB + 512, b"\x33" * 4096)
    storage.flush_disk(a.disks[0].name)
    result = applier_for(src, {0: MiB}).apply_pending(crash_consistent_interval_s=0)
    assert result.ok and result.applied_seq == src.seq
    b = applier_for(src, {0: MiB})
    point = b.list_points()[-1]
    assert image(b, point.point_id, 0) == bytes(src.disks[0]) and len(src.disks[0]) == 2 * MiB
