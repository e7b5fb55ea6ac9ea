"""The apply engine against real storage (local directory and Azurite): byte-exact recovery
points, point cadence, replay after SIGKILL, rejection of bad logs, space and retention."""
from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from replication.dataplane import batch as wire
from replication.dataplane.apply import (
    APP_CONSISTENT,
    CRASH_CONSISTENT,
    PointNotFound,
    ReplicaApplier,
)
from replication.dataplane.sealing import new_key, seal
from replication.dataplane.storage import SnapshotNotFound, Storage
from replication.dataplane.storage.local import LocalStorage

try:
    from tests.dataplane.azurite import azurite, storage, storage_config  # noqa: F401 - fixtures
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from azurite import azurite, storage, storage_config  # type: ignore[no-redef]  # noqa: F401

MiB = 1024 * 1024
SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND
REPO = str(Path(__file__).resolve().parents[2])


class Source:
    """A simulated protected VM: disks written with known data, shipped as sealed batches
    exactly as the process server stores them, with each disk's SHA-256 after every batch."""

    def __init__(self, storage: Storage, sizes: dict[int, int], *, seed: int = 0, key: bytes | None = None):
        self.storage = storage
        self.item_id = uuid.uuid4()
        self.key = key or new_key()
        self.disks = {i: bytearray(size) for i, size in sizes.items()}
        self.rng = random.Random(seed)
        self.seq = 0
        self.time_ns = T0
        self.hashes: dict[int, dict[int, str]] = {}
        self.sealed: dict[int, bytes] = {}
        self.meta: dict[int, tuple[int, int, object]] = {}  # seq -> (time, flags, bookmark)
        self.data_bytes = 0

    def disk_specs(self, prefix: str = "rep") -> dict[int, tuple[str, int]]:
        return {i: (f"{prefix}-{self.item_id.hex[:12]}-{i}", len(d)) for i, d in self.disks.items()}

    def applier(self, **kw) -> ReplicaApplier:
        return ReplicaApplier(self.storage, key=self.key, item_id=self.item_id, disks=self.disk_specs(), **kw)

    def log_key(self, seq: int) -> str:
        return f"logs/{self.item_id}/{seq:020d}.lbs"

    def send(self, writes, *, flags: int = 0, bookmark=None, dt_s: float = 1.0, upload: bool = True) -> int:
        records = []
        for disk, offset, data in writes:
            self.disks[disk][offset : offset + len(data)] = data
            records.append(wire.Record(wire.KIND_WRITE, disk, offset, data))
            self.data_bytes += len(data)
        if bookmark is not None:
            records.append(wire.Record(wire.KIND_BOOKMARK, 0, 0, json.dumps(bookmark).encode()))
        self.seq += 1
        self.time_ns += int(dt_s * SECOND)
        raw = wire.encode(
            item_id=self.item_id, seq=self.seq, source_time_ns=self.time_ns, records=records, flags=flags
        )
        sealed = seal(raw, key=self.key, context=f"{self.item_id}:{self.seq}".encode())
        self.sealed[self.seq] = sealed
        self.meta[self.seq] = (self.time_ns, flags, bookmark)
        if upload:
            self.storage.put_object(self.log_key(self.seq), sealed)
        self.hashes[self.seq] = {i: hashlib.sha256(d).hexdigest() for i, d in self.disks.items()}
        return self.seq

    def initial_copy(self, piece: int = MiB) -> int:
        chunks = [(i, off) for i, d in self.disks.items() for off in range(0, len(d), piece)]
        for n, (i, off) in enumerate(chunks):
            length = min(piece, len(self.disks[i]) - off)
            flags = wire.FLAG_INITIAL | (wire.FLAG_INITIAL_DONE if n == len(chunks) - 1 else 0)
            self.send([(i, off, self.rng.randbytes(length))], flags=flags, dt_s=0.1)
        return self.seq

    def random_writes(self, count: int, max_sectors: int = 256) -> list[tuple[int, int, bytes]]:
        out = []
        for _ in range(count):
            disk = self.rng.choice(sorted(self.disks))
            size = len(self.disks[disk])
            length = min(self.rng.randint(1, max_sectors) * 512, size)
            offset = self.rng.randrange(0, (size - length) // 512 + 1) * 512
            out.append((disk, offset, self.rng.randbytes(length)))
        return out


def expected_points(source: Source, interval_s: float) -> list[tuple[int, str]]:
    """The points the documented rule gives for the batches sent so far."""
    out: list[tuple[int, str]] = []
    complete = False
    last = None
    for seq in sorted(source.meta):
        t, flags, bookmark = source.meta[seq]
        if flags & wire.FLAG_INITIAL_DONE:
            complete = True
        mid_copy = flags & wire.FLAG_INITIAL and not flags & wire.FLAG_INITIAL_DONE
        if not complete or flags & wire.FLAG_RESYNC or mid_copy:
            continue
        if bookmark is not None:
            out.append((seq, APP_CONSISTENT))
            last = t
        elif last is None or t - last >= interval_s * SECOND or t < last:
            out.append((seq, CRASH_CONSISTENT))
            last = t
    return out


def image_sha(applier: ReplicaApplier, point_id: str, disk: int) -> str:
    h = hashlib.sha256()
    for piece in applier.iter_disk_image(point_id, disk, chunk=3 * MiB):
        h.update(piece)
    return h.hexdigest()


def live_sha(source: Source, disk: int) -> str:
    name, size = source.disk_specs()[disk]
    h = hashlib.sha256()
    for piece in source.storage.iter_disk(name):
        h.update(piece)
    return h.hexdigest()


def assert_points_exact(applier: ReplicaApplier, source: Source, skip: set[str] = frozenset()) -> int:
    checked = 0
    for p in applier.list_points():
        if p.point_id in skip:
            continue
        assert sorted(p.snapshots) == sorted(source.disks), p
        for disk in source.disks:
            assert image_sha(applier, p.point_id, disk) == source.hashes[p.seq][disk], (
                f"{p.kind} point {p.point_id} (seq {p.seq}) disk {disk} differs from the source at that seq"
            )
        checked += 1
    return checked


def assert_no_stray_snapshots(source: Source, applier: ReplicaApplier) -> None:
    points = applier.list_points()
    for disk, (name, _size) in source.disk_specs().items():
        assert source.storage.list_snapshots(name) == sorted(p.snapshots[disk] for p in points)


# -- byte-exact recovery ----------------------------------------------------------------------


def test_points_are_byte_exact_while_writing_on(storage):
    source = Source(storage, {0: 6 * MiB, 1: 3 * MiB + 1536}, seed=11)
    applier = source.applier()
    rng = random.Random(12)

    source.initial_copy(piece=MiB)
    first = applier.apply_pending(crash_consistent_interval_s=5, max_batches=4)
    assert first.batches_applied == 4 and first.new_points == [] and not first.initial_copy_complete
    assert first.more_pending
    total = first.bytes_applied
    bookmarks = 0
    for round_ in range(14):
        for _ in range(rng.randint(1, 4)):
            bookmark = None
            if rng.random() < 0.2:
                bookmarks += 1
                bookmark = {"name": f"vss-{bookmarks}", "round": round_}
            writes = source.random_writes(rng.randint(1, 6))
            source.send(writes, bookmark=bookmark, dt_s=rng.choice([0.5, 1, 2, 6]))
        r = applier.apply_pending(crash_consistent_interval_s=5, max_batches=rng.choice([None, 2, 5]))
        assert r.ok, r.errors
        total += r.bytes_applied
    while (r := applier.apply_pending(crash_consistent_interval_s=5)).batches_applied:
        total += r.bytes_applied
    assert r.applied_seq == source.seq and r.initial_copy_complete
    assert r.last_source_time_ns == source.time_ns
    assert total == source.data_bytes

    points = applier.list_points()
    assert [(p.seq, p.kind) for p in points] == expected_points(source, 5)
    assert points[0].seq == max(s for s, (_t, f, _b) in source.meta.items() if f & wire.FLAG_INITIAL_DONE)
    assert sum(p.kind == APP_CONSISTENT for p in points) == bookmarks >= 1
    for p in points:
        if p.kind == APP_CONSISTENT:
            assert p.label == source.meta[p.seq][2]
        assert p.source_time_ns == source.meta[p.seq][0]
    assert assert_points_exact(applier, source) == len(points) >= 8
    for disk in source.disks:
        assert live_sha(source, disk) == source.hashes[source.seq][disk]
    assert storage.list_objects(f"logs/{source.item_id}/") == []  # applied logs are deleted
    assert_no_stray_snapshots(source, applier)

    p = points[len(points) // 2]
    disk1 = source.disk_specs()[1][1]
    assert applier.disk_size_at(p.point_id, 1) == disk1
    assert len(applier.read_disk_at(p.point_id, 1, disk1 - 1000, 1000)) == 1000


def test_point_cadence_follows_flags_bookmarks_and_interval(tmp_path):
    storage = LocalStorage(str(tmp_path))
    source = Source(storage, {0: MiB}, seed=13)
    w = lambda: [(0, 0, source.rng.randbytes(4096))]  # noqa: E731
    source.send(w(), flags=wire.FLAG_INITIAL, bookmark={"early": True}, dt_s=0)  # 1: skipped, copy incomplete
    source.send(w(), flags=wire.FLAG_INITIAL | wire.FLAG_INITIAL_DONE, dt_s=1)  # 2: t=1 first point
    source.send(w(), dt_s=2)  # 3: t=3
    source.send(w(), dt_s=3)  # 4: t=6 (5 s after the last point)
    source.send(w(), bookmark={"name": "nightly"}, dt_s=1)  # 5: t=7 app-consistent
    source.send(w(), dt_s=1)  # 6: t=8
    source.send(w(), dt_s=3)  # 7: t=11 (4 s)
    source.send(w(), dt_s=1)  # 8: t=12 (5 s)
    source.send(w(), flags=wire.FLAG_RESYNC, dt_s=18)  # 9: t=30 resync in progress
    source.send(w(), flags=wire.FLAG_RESYNC, bookmark={"mid": "resync"}, dt_s=1)  # 10: skipped
    source.send(w(), dt_s=1)  # 11: t=32 consistent again
    source.send(w(), dt_s=-20)  # 12: the source clock went back
    want = [(2, CRASH_CONSISTENT), (4, CRASH_CONSISTENT), (5, APP_CONSISTENT), (8, CRASH_CONSISTENT),
            (11, CRASH_CONSISTENT), (12, CRASH_CONSISTENT)]
    assert expected_points(source, 5) == want

    r = source.applier().apply_pending(crash_consistent_interval_s=5)
    assert [(p.seq, p.kind) for p in r.new_points] == want
    assert r.bookmarks_skipped == 2 and r.points_cut == 6
    assert r.new_points[2].label == {"name": "nightly"}

    # One batch per pass, in another replica of the same stream: the same points.
    other = LocalStorage(str(tmp_path / "other"))
    for seq, sealed in source.sealed.items():
        other.put_object(source.log_key(seq), sealed)
    applier = ReplicaApplier(other, key=source.key, item_id=source.item_id, disks=source.disk_specs())
    while applier.apply_pending(crash_consistent_interval_s=5, max_batches=1).batches_applied:
        pass
    assert [(p.seq, p.kind) for p in applier.list_points()] == want


def test_waits_at_a_gap_in_the_logs(tmp_path):
    storage = LocalStorage(str(tmp_path))
    source = Source(storage, {0: MiB}, seed=14)
    source.initial_copy()
    source.send(source.random_writes(2))
    held = source.seq + 1
    source.send(source.random_writes(2), upload=False)  # not uploaded yet
    source.send(source.random_writes(2))
    applier = source.applier()
    r = applier.apply_pending(crash_consistent_interval_s=5)
    assert r.applied_seq == held - 1 and r.waiting_for_seq == held and r.ok
    storage.put_object(source.log_key(held), source.sealed[held])
    r = applier.apply_pending(crash_consistent_interval_s=5)
    assert r.applied_seq == source.seq and r.waiting_for_seq is None
    assert live_sha(source, 0) == source.hashes[source.seq][0]


# -- crash and replay -------------------------------------------------------------------------

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from replication.dataplane.storage import open_storage
from replication.dataplane.apply import ReplicaApplier
config, key, item = json.loads(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4]
disks, last = json.loads(sys.argv[5]), int(sys.argv[6])
applier = ReplicaApplier(open_storage(config), key=key, item_id=item,
                         disks={int(i): tuple(v) for i, v in disks.items()}, checkpoint_bytes=512 * 1024)
print("ready", flush=True)
while True:
    r = applier.apply_pending(crash_consistent_interval_s=5, max_batches=3)
    if r.errors:
        print("errors", r.errors, flush=True)
        sys.exit(2)
    if r.applied_seq >= last:
        break
    print("pass", r.applied_seq, flush=True)
print("done", flush=True)
"""


def test_sigkill_at_random_moments_then_resume(storage):
    """SIGKILL a process applying the logs at random moments, many times; after each kill
    every visible point is byte-exact, and resuming ends with the source's exact bytes."""
    local = isinstance(storage, LocalStorage)
    # A kill lands after 0-2 passes of at most 3 batches, at a random moment of the next
    # one: always mid-work, whatever the machine's speed. Azure passes are slower (HTTP per
    # page write), so fewer kills there.
    kills, batches, pass_s = (15, 250, 0.06) if local else (8, 100, 0.4)
    source = Source(storage, {0: 4 * MiB, 1: 2 * MiB}, seed=21)
    rng = random.Random(22)
    source.initial_copy(piece=512 * 1024)
    for n in range(batches):
        bookmark = {"n": n} if n % 11 == 5 else None
        writes = source.random_writes(rng.randint(2, 8), max_sectors=512)
        source.send(writes, bookmark=bookmark, dt_s=rng.choice([1, 2, 3]))
    args = [
        sys.executable, "-c", _CHILD, REPO, json.dumps(storage_config(storage)), source.key.hex(),
        str(source.item_id), json.dumps(source.disk_specs()), str(source.seq),
    ]
    applier = source.applier()
    verified: set[str] = set()
    busy_kills = 0
    progress = []
    for _ in range(kills):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline().strip()
        assert line == "ready", f"child did not start: {line!r} {proc.stderr.read()}"
        for _ in range(rng.randint(0, 2)):
            line = proc.stdout.readline().strip()
            if not line.startswith("pass"):
                pytest.fail(f"the applying process stopped: {line!r} {proc.stderr.read()}")
        time.sleep(rng.uniform(0, pass_s))
        if proc.poll() is None:
            busy_kills += 1
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()
        # Whatever the kill interrupted, every visible point is already byte-exact (check
        # the new ones and the last few again; snapshots never change once taken).
        points = applier.list_points()
        recheck = {p.point_id for p in points[-3:]}
        assert_points_exact(applier, source, skip=verified - recheck)
        verified |= {p.point_id for p in points}
        progress.append(applier.status().applied_seq)
        if proc.returncode == 0:
            break  # all applied: later kills could not land mid-work
    assert busy_kills >= kills - 1, f"the applier finished before the kills landed mid-work: {progress}"
    assert progress[-1] > progress[0], progress

    while (r := applier.apply_pending(crash_consistent_interval_s=5)).batches_applied or r.points_cut:
        assert r.ok, r.errors
    assert r.applied_seq == source.seq
    points = applier.list_points()
    assert [(p.seq, p.kind) for p in points] == expected_points(source, 5)
    assert assert_points_exact(applier, source) == len(points)
    for disk in source.disks:
        assert live_sha(source, disk) == source.hashes[source.seq][disk]
    assert_no_stray_snapshots(source, applier)
    assert storage.list_objects(f"logs/{source.item_id}/") == []


class _Crash(Exception):
    pass


class _CrashOnSnapshot:
    """The real storage, except that the n-th disk snapshot from now raises _Crash *after*
    it was taken: the engine stops right there, as if its process had died."""

    def __init__(self, inner: Storage, nth: int):
        self.inner = inner
        self.left = nth

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def snapshot_disk(self, name):
        sid = self.inner.snapshot_disk(name)
        self.left -= 1
        if self.left == 0:
            raise _Crash(name)
        return sid


def test_a_cut_interrupted_between_disks_never_shows_a_half_point(storage):
    source = Source(storage, {0: 2 * MiB, 1: MiB, 2: MiB}, seed=31)
    source.initial_copy()
    source.applier().apply_pending(crash_consistent_interval_s=5)
    before = source.applier().list_points()
    source.send(source.random_writes(4), bookmark={"name": "app"}, dt_s=1)

    crashing = ReplicaApplier(
        _CrashOnSnapshot(storage, nth=2), key=source.key, item_id=source.item_id, disks=source.disk_specs()
    )
    with pytest.raises(_Crash):
        crashing.apply_pending(crash_consistent_interval_s=5)
    assert source.applier().list_points() == before  # disk 0 was snapshotted, yet no half point

    r = source.applier().apply_pending(crash_consistent_interval_s=5)  # "after the restart"
    assert [(p.seq, p.kind) for p in r.new_points] == [(source.seq, APP_CONSISTENT)]
    assert r.batches_applied == 0  # the batch itself was durable before the cut began
    assert assert_points_exact(source.applier(), source) == len(before) + 1
    assert_no_stray_snapshots(source, source.applier())


# -- bad logs -----------------------------------------------------------------------------------


def test_tampered_truncated_and_foreign_logs_are_rejected(storage):
    source = Source(storage, {0: 2 * MiB, 1: MiB}, seed=41)
    source.initial_copy()
    applier = source.applier()
    assert applier.apply_pending(crash_consistent_interval_s=5).ok
    good_seq = source.send(source.random_writes(5))
    source.send(source.random_writes(3))  # a good log after the bad one must wait too
    good = source.sealed[good_seq]
    key = source.log_key(good_seq)
    before = {d: live_sha(source, d) for d in source.disks}
    points_before = applier.list_points()

    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0x01
    other_item = uuid.uuid4()
    other_plain = wire.encode(
        item_id=other_item, seq=good_seq, source_time_ns=T0,
        records=[wire.Record(wire.KIND_WRITE, 0, 0, b"\xee" * 512)],
    )
    past_end = wire.encode(
        item_id=source.item_id, seq=good_seq, source_time_ns=T0,
        records=[wire.Record(wire.KIND_WRITE, 1, MiB, b"\xee" * 512)],
    )
    wrong_disk = wire.encode(
        item_id=source.item_id, seq=good_seq, source_time_ns=T0,
        records=[wire.Record(wire.KIND_WRITE, 7, 0, b"\xee" * 512)],
    )
    here = f"{source.item_id}:{good_seq}".encode()
    # (Logs that fail authentication or decoding are lost ones: test_unreadable_logs_...)
    bad_logs = {
        # Authentic and well formed, yet not a valid batch for this item.
        "batch of another item": (
            seal(other_plain, key=source.key, context=here), "invalid", str(other_item)
        ),
        "write past the disk": (seal(past_end, key=source.key, context=here), "invalid", "past its"),
        "unknown disk": (seal(wrong_disk, key=source.key, context=here), "invalid", "disk 7"),
    }
    for what, (blob, reason, says) in bad_logs.items():
        storage.put_object(key, blob)
        r = applier.apply_pending(crash_consistent_interval_s=5)
        assert r.batches_applied == 0 and r.bytes_applied == 0 and r.new_points == [], what
        assert [(e.seq, e.key, e.reason) for e in r.errors] == [(good_seq, key, reason)], (what, r.errors)
        assert says in r.errors[0].message and str(good_seq) in str(r.errors[0]), (what, r.errors[0])
        assert r.applied_seq == good_seq - 1, what
        assert {d: live_sha(source, d) for d in source.disks} == before, f"{what}: the replica changed"
        assert storage.get_object(key) == blob, f"{what}: a rejected log must stay for inspection"
        assert applier.list_points() == points_before

    storage.put_object(key, good)  # the process server re-uploads the genuine log
    r = applier.apply_pending(crash_consistent_interval_s=5)
    assert r.ok and r.applied_seq == source.seq and r.batches_applied == 2
    for d in source.disks:
        assert live_sha(source, d) == source.hashes[source.seq][d]


def unreadable_logs(source: Source, seq: int) -> dict[str, tuple[bytes, str]]:
    good = source.sealed[seq]
    here = f"{source.item_id}:{seq}".encode()
    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0x01
    other_item = uuid.uuid4()
    other_plain = wire.encode(item_id=other_item, seq=seq, source_time_ns=T0,
                              records=[wire.Record(wire.KIND_WRITE, 0, 0, b"\xee" * 512)])
    return {
        "tampered": (bytes(tampered), "tampered"),
        "truncated": (good[:-7], "tampered"),
        "empty": (b"", "tampered"),
        # Sealed for another item: it fails authentication under this item's context.
        "another item's log": (seal(other_plain, key=source.key, context=f"{other_item}:{seq}".encode()), "tampered"),
        "another seq's log": (source.sealed[seq + 1], "tampered"),
        "wrong key": (seal(b"x" * 100, key=new_key(), context=here), "tampered"),
        "not a batch": (seal(b"garbage" * 10, key=source.key, context=here), "malformed"),
    }


@pytest.mark.parametrize("what", ["tampered", "truncated", "empty", "another item's log", "another seq's log",
                                  "wrong key", "not a batch"])
def test_unreadable_logs_are_quarantined_never_skipped_silently(storage, what):
    """A log that fails authentication or decoding is lost: it is moved intact to quarantine,
    reported in ``lost``, the stream goes on after it and no point is cut until a resync
    has compared the replica as read after it (``repair_compared``)."""
    source = Source(storage, {0: 2 * MiB, 1: MiB}, seed=43)
    source.initial_copy()
    applier = source.applier()
    assert applier.apply_pending(crash_consistent_interval_s=0).ok
    points_before = applier.list_points()
    bad_seq = source.send(source.random_writes(5))
    source.send(source.random_writes(3), dt_s=10)
    blob, reason = unreadable_logs(source, bad_seq)[what]
    storage.put_object(source.log_key(bad_seq), blob)

    r = applier.apply_pending(crash_consistent_interval_s=0)
    assert [(e.seq, e.reason) for e in r.lost] == [(bad_seq, reason)], r.lost
    assert r.ok and r.applied_seq == source.seq and r.batches_applied == 1 and r.damaged_since == bad_seq
    assert r.new_points == [] and applier.list_points() == points_before  # damaged: no point
    quarantined = storage.list_objects(f"quarantine/{source.item_id}/")
    assert len(quarantined) == 1 and storage.get_object(quarantined[0]) == blob  # kept intact
    assert source.log_key(bad_seq) not in storage.list_objects(f"logs/{source.item_id}/")

    # A resync whose digests were read before the loss does not clear it; one read after does.
    assert not applier.repair_compared(from_seq=bad_seq - 1)
    source.send(source.random_writes(2), dt_s=10)
    assert applier.apply_pending(crash_consistent_interval_s=0).new_points == []
    assert applier.repair_compared(from_seq=bad_seq + 2)
    source.send(source.random_writes(2), dt_s=10)
    r = applier.apply_pending(crash_consistent_interval_s=0)
    assert len(r.new_points) == 1 and r.damaged_since is None


def test_a_missing_log_is_waited_for_then_owned_up_to(storage):
    """A hole in the stream with later logs present is waited for (the grace), then reported
    as lost and bridged: never skipped silently, and no point until repaired."""
    source = Source(storage, {0: MiB}, seed=44)
    source.initial_copy()
    applier = source.applier()
    applier.apply_pending(crash_consistent_interval_s=0)
    applied = source.seq
    hole = source.send(source.random_writes(2), upload=False)
    source.send(source.random_writes(2), dt_s=10)
    r = applier.apply_pending(now_ns=T0, crash_consistent_interval_s=0, gap_grace_s=60)
    assert r.waiting_for_seq == hole and r.applied_seq == applied and r.lost == []
    r = applier.apply_pending(now_ns=T0 + 59 * SECOND, crash_consistent_interval_s=0, gap_grace_s=60)
    assert r.waiting_for_seq == hole and r.lost == []
    r = applier.apply_pending(now_ns=T0 + 61 * SECOND, crash_consistent_interval_s=0, gap_grace_s=60)
    assert [(e.seq, e.reason) for e in r.lost] == [(hole, "missing")]
    assert r.applied_seq == source.seq and r.damaged_since == hole and r.new_points == []
    # The lost log turning up late is not applied behind the replica's back.
    storage.put_object(source.log_key(hole), source.sealed[hole])
    r = applier.apply_pending(crash_consistent_interval_s=0)
    assert r.batches_applied == 0 and not storage.list_objects(f"logs/{source.item_id}/")


def test_points_after_a_live_scan_are_not_crash_consistent(storage):
    source = Source(storage, {0: MiB}, seed=45)
    source.initial_copy()
    applier = source.applier()
    assert applier.apply_pending(crash_consistent_interval_s=0).new_points[-1].consistent
    source.send(source.random_writes(2), flags=wire.FLAG_UNFROZEN, dt_s=10)
    r = applier.apply_pending(crash_consistent_interval_s=0)
    assert [p.consistent for p in r.new_points] == [False]
    assert [p.consistent for p in applier.list_points()] == [True, False]


# -- space and retention --------------------------------------------------------------------------


def test_space_grows_with_changed_data_not_points_and_pruning_reclaims(tmp_path):
    storage = LocalStorage(str(tmp_path))
    size = 32 * MiB
    source = Source(storage, {0: size}, seed=51)
    source.initial_copy(piece=4 * MiB)
    applier = source.applier()
    applier.apply_pending(crash_consistent_interval_s=5)
    prefix = "rep-"
    base = storage.used_bytes(prefix)
    assert size <= base < size + MiB

    touched = set()
    for _ in range(50):
        chunk = source.rng.randrange(size // MiB)
        touched.add(chunk)
        offset = chunk * MiB + source.rng.randrange(0, 16) * 64 * 1024
        source.send([(0, offset, source.rng.randbytes(64 * 1024))], dt_s=5)
        assert applier.apply_pending(crash_consistent_interval_s=5).points_cut == 1
    points = applier.list_points()
    assert len(points) == 51
    grown = storage.used_bytes(prefix) - base
    # Copy-on-write copies only the chunks the writes touched (1 MiB each, plus a few bytes
    # of map per point); 50 copies of the disk would be 1.6 GiB.
    assert grown <= 50 * MiB + 50 * 8 * 1024, grown
    assert_points_exact(applier, source, skip={p.point_id for p in points[1:-1]})

    used = storage.used_bytes(prefix)
    pruned = applier.prune_points(older_than_ns=points[30].source_time_ns)
    assert [p.point_id for p in pruned] == [p.point_id for p in points[:30]]
    after = storage.used_bytes(prefix)
    assert after < used - 10 * MiB, (used, after)

    pruned = applier.prune_points(older_than_ns=source.time_ns + 1000 * SECOND)
    left = applier.list_points()
    assert left == [points[-1]]  # retention always keeps the newest point
    assert storage.used_bytes(prefix) <= base + 64 * 1024
    assert_points_exact(applier, source)
    assert_no_stray_snapshots(source, applier)


def test_retention_keeps_the_newest_point_and_deletes_snapshots(storage):
    source = Source(storage, {0: 2 * MiB}, seed=61)
    source.initial_copy()
    applier = source.applier()
    for _ in range(5):
        source.send(source.random_writes(4, max_sectors=2048), dt_s=10)
    applier.apply_pending(crash_consistent_interval_s=5)
    points = applier.list_points()
    assert len(points) == 6
    used = storage.used_bytes("rep-")

    assert applier.prune_points(older_than_ns=points[0].source_time_ns) == []
    pruned = applier.prune_points(older_than_ns=points[3].source_time_ns)
    assert [p.seq for p in pruned] == [p.seq for p in points[:3]]
    assert storage.used_bytes("rep-") < used
    with pytest.raises(PointNotFound):
        applier.read_disk_at(points[0].point_id, 0, 0, 512)
    name = source.disk_specs()[0][0]
    with pytest.raises(SnapshotNotFound):
        storage.read_disk(name, 0, 512, snapshot=points[0].snapshots[0])

    applier.prune_points(older_than_ns=source.time_ns * 2)
    assert applier.list_points() == [points[-1]]
    assert_points_exact(applier, source)
    assert_no_stray_snapshots(source, applier)


def test_delete_replica_removes_disks_points_logs_and_state(storage):
    source = Source(storage, {0: MiB, 1: MiB}, seed=71)
    source.initial_copy()
    applier = source.applier()
    applier.apply_pending(crash_consistent_interval_s=5)
    source.send(source.random_writes(2))  # a log not applied yet
    assert applier.list_points()
    applier.delete_replica()
    applier.delete_replica()  # again: nothing left, no error
    assert applier.list_points() == []
    for name, _size in source.disk_specs().values():
        assert not storage.disk_exists(name)
    assert storage.list_objects(f"logs/{source.item_id}/") == []
    assert storage.list_objects(f"replicas/{source.item_id}/") == []
    with pytest.raises(PointNotFound):
        applier.read_disk_at("nope", 0, 0, 512)


# -- the stream's position: no log deleted unapplied on the strength of its number -----------


def test_a_log_numbered_behind_the_replica_is_kept_aside_never_applied_nor_dropped(tmp_path):
    """A stream whose numbering went back (a process server that lost its place) delivers
    logs at seqs the replica applied and cleaned up long ago: they are moved to quarantine
    intact and reported, the replica's bytes do not change, and the stream's floor still
    says where the replica stands."""
    from replication.dataplane.apply import stream_floor

    storage = LocalStorage(str(tmp_path))
    source = Source(storage, {0: 2 * MiB}, seed=21)
    source.initial_copy()
    for _ in range(4):
        source.send(source.random_writes(3))
    applier = source.applier()
    applier.apply_pending(crash_consistent_interval_s=0)
    applier.apply_pending(crash_consistent_interval_s=0)  # settles the clean-up mark
    applied = source.seq
    before = live_sha(source, 0)
    assert stream_floor(storage, source.item_id) == applied  # no log left: the replica says it

    # The same seqs again, other bytes (numbering restarted at 2).
    other = Source(storage, {0: 2 * MiB}, seed=99, key=source.key)
    other.item_id = source.item_id
    other.seq = 1
    other.send(other.random_writes(3))
    other.send(other.random_writes(3))
    r = applier.apply_pending(crash_consistent_interval_s=0)
    assert [m.seq for m in r.misplaced] == [2, 3] and r.batches_applied == 0
    assert live_sha(source, 0) == before  # nothing of them applied
    assert storage.list_objects(f"logs/{source.item_id}/") == []
    kept = storage.list_objects(f"quarantine/{source.item_id}/")
    assert len(kept) == 2
    assert sorted(storage.get_object(k) for k in kept) == sorted([other.sealed[2], other.sealed[3]])
    assert applier.status().applied_seq == applied
    applier.delete_replica()
    assert storage.list_objects(f"quarantine/{source.item_id}/") == []


def test_a_reupload_of_an_applied_log_and_a_cut_short_clean_up_are_dropped_quietly(tmp_path):
    """What a number alone may not condemn, identity may: the very object applied before (a
    process server that re-uploads after a crash) and logs applied but not yet deleted when
    the clean-up was cut short go, with nothing reported."""
    storage = LocalStorage(str(tmp_path))
    source = Source(storage, {0: MiB}, seed=22)
    source.initial_copy()
    source.send(source.random_writes(2))
    applier = source.applier()
    applier.apply_pending(crash_consistent_interval_s=0)
    source.send(source.random_writes(2))
    applier.apply_pending(crash_consistent_interval_s=0)
    # The process server puts an applied log again (same sealed object) ...
    storage.put_object(source.log_key(source.seq - 1), source.sealed[source.seq - 1])
    # ... and a crash left the newest applied log undeleted.
    storage.put_object(source.log_key(source.seq), source.sealed[source.seq])
    r = applier.apply_pending(crash_consistent_interval_s=0)
    assert r.misplaced == [] and r.ok
    assert storage.list_objects(f"logs/{source.item_id}/") == []
    assert storage.list_objects(f"quarantine/{source.item_id}/") == []
    assert live_sha(source, 0) == source.hashes[source.seq][0]


def test_delete_points_removes_exactly_those_points_and_their_snapshots(tmp_path):
    """Commit releases the points a failed-over VM no longer needs, newer ones included: the
    kept point stays byte-exact and no snapshot is left behind."""
    storage = LocalStorage(str(tmp_path))
    source = Source(storage, {0: 2 * MiB, 1: MiB}, seed=23)
    source.initial_copy()
    for _ in range(5):
        source.send(source.random_writes(4))
    applier = source.applier()
    applier.apply_pending(crash_consistent_interval_s=0)
    points = applier.list_points()
    assert len(points) >= 4
    keep = points[1]
    gone = applier.delete_points([p.point_id for p in points if p is not keep] + ["no-such-point"])
    assert sorted(p.point_id for p in gone) == sorted(p.point_id for p in points if p is not keep)
    assert [p.point_id for p in applier.list_points()] == [keep.point_id]
    assert_no_stray_snapshots(source, applier)
    assert assert_points_exact(applier, source) == 1
