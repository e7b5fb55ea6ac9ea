"""Seeded replicas (failback): ``ReplicaApplier.seed`` fills a new replica from a copy of the
disks that already exists (a sparse image file, or pieces of bytes), byte for byte, and the
agent of an item whose assignment says ``seeded`` compares its disks with that replica
instead of copying them, sending only the blocks that differ. Real storage (local directory
and Azurite), a real process server, the real apply engine and digest answers."""
from __future__ import annotations

import os
import random
import shutil
import uuid

import pytest

from mobility import wire
from mobility.agent import Agent, ItemAssignment, load_item_state
from mobility.filter import WriteFilter
from replication.dataplane import batch as batch_format
from replication.dataplane.apply import (
    CRASH_CONSISTENT,
    ApplyStateError,
    DiskSpec,
    ReplicaApplier,
)
from replication.dataplane.sealing import new_key, seal
from replication.dataplane.storage import Storage
from replication.dataplane.storage.local import LocalStorage

try:
    from tests.dataplane.azurite import azurite, storage  # noqa: F401 - fixtures
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        assignment_for, config_server, machine_for, make_disk, start_ps, vault, wait_for,
    )
    from tests.dataplane.test_agent import BLOCK, FAST_RETRY, ReplicaWorker, fine_blocks, small_agent
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from azurite import azurite, storage  # type: ignore[no-redef]  # noqa: F401
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        assignment_for, config_server, machine_for, make_disk, start_ps, vault, wait_for,
    )
    from test_agent import BLOCK, FAST_RETRY, ReplicaWorker, fine_blocks, small_agent  # type: ignore[no-redef]

MiB = 1024 * 1024
T0 = 1_700_000_000 * 1_000_000_000


def _replica(storage: Storage, item_id: uuid.UUID, key: bytes, sizes: dict[int, int]) -> ReplicaApplier:
    return ReplicaApplier(storage, key=key, item_id=item_id,
                          disks={i: DiskSpec(f"seed-{item_id.hex[:12]}-{i}", size) for i, size in sizes.items()})


def _upload(storage: Storage, item_id: uuid.UUID, key: bytes, seq: int, writes, *, flags: int = 0) -> None:
    """Put one sealed log in storage, as the process server does."""
    records = [batch_format.Record(batch_format.KIND_WRITE, disk, offset, data) for disk, offset, data in writes]
    raw = batch_format.encode(item_id=item_id, seq=seq, source_time_ns=T0 + seq, records=records, flags=flags)
    storage.put_object(f"logs/{item_id}/{seq:020d}.lbs", seal(raw, key=key, context=f"{item_id}:{seq}".encode()))


def _disk_bytes(storage: Storage, name: str) -> bytes:
    return b"".join(storage.iter_disk(name))


def _sparse_image(path: str, length: int, rng: random.Random) -> bytes:
    """A sparse image of ``length`` bytes (not a whole number of sectors): data at a few
    places, one piece of zeros written as data, holes elsewhere. Returns its bytes."""
    image = bytearray(length)
    with open(path, "wb") as f:
        f.truncate(length)
        for offset, data in [
            (0, rng.randbytes(4096)),
            (3 * MiB + 512, rng.randbytes(2 * MiB)),  # across a piece boundary, at an odd sector
            (8 * MiB, bytes(MiB)),  # zeros that take space in the file: read, not written
            (11 * MiB - 4096, rng.randbytes(8192)),
            (length - 700, rng.randbytes(700)),  # up to the image's unaligned end
        ]:
            f.seek(offset)
            f.write(data)
            image[offset : offset + len(data)] = data
    return bytes(image)


def _has_holes(path: str) -> bool:
    with open(path, "rb") as f:
        try:
            return os.lseek(f.fileno(), 0, os.SEEK_HOLE) < os.fstat(f.fileno()).st_size
        except OSError:
            return False


def test_seed_copies_a_sparse_image_and_pieces_byte_for_byte_and_points_follow(storage, tmp_path):
    """Disk 0 from a sparse image shorter than the disk (unaligned end), disk 1 from pieces
    of odd sizes: the replica holds exactly those bytes, zeros after them; holes are not
    read and zeros are not written. The replica counts as initially copied: the next batch
    cuts a point whose image is the seed plus the batch's writes. A second seed is refused
    once a batch is applied."""
    rng = random.Random(5)
    item_id, key = uuid.uuid4(), new_key()
    s0, s1 = 24 * MiB, 8 * MiB
    path = str(tmp_path / "original-0.img")
    image0 = _sparse_image(path, 20 * MiB - 700 + 123, rng)
    pieces = [rng.randbytes(1000), bytes(3 * MiB), rng.randbytes(3 * MiB + 7), b"", rng.randbytes(300),
              bytes(5000), rng.randbytes(65536 - 11)]
    image1 = b"".join(pieces)
    applier = _replica(storage, item_id, key, {0: s0, 1: s1})

    result = applier.seed({0: path, 1: iter(pieces)})
    names = {i: s.name for i, s in applier.disks.items()}
    assert _disk_bytes(storage, names[0]) == image0 + bytes(s0 - len(image0))
    assert _disk_bytes(storage, names[1]) == image1 + bytes(s1 - len(image1))
    assert result.bytes_read[1] == len(image1)
    # Only the 1 MiB units holding data are written (0, 3-5, 10-11 and the last); the zeros
    # the image holds as data (at 8 MiB) and the 3 MiB of zero pieces are not.
    assert result.bytes_written[0] <= 7 * MiB
    assert result.bytes_written[1] == -(-len(image1) // 512) * 512 - 2 * MiB
    if _has_holes(path):
        assert result.bytes_read[0] < 8 * MiB  # the holes were not read
    status = applier.status()
    assert (status.applied_seq, status.initial_copy_complete, status.point_count) == (0, True, 0)

    # The next batch (no initial-copy flags: the copy is the seed) cuts a point at once.
    writes = [(0, 3 * MiB, rng.randbytes(8192)), (1, s1 - 4096, rng.randbytes(4096))]
    _upload(storage, item_id, key, 1, writes)
    applied = applier.apply_pending(crash_consistent_interval_s=3600)
    assert applied.ok and applied.batches_applied == 1
    [point] = applied.new_points
    assert point.kind == CRASH_CONSISTENT and point.seq == 1
    for index, image, size in ((0, image0, s0), (1, image1, s1)):
        expected = bytearray(image + bytes(size - len(image)))
        for disk, offset, data in writes:
            if disk == index:
                expected[offset : offset + len(data)] = data
        assert b"".join(applier.iter_disk_image(point.point_id, index)) == bytes(expected), index

    with pytest.raises(ApplyStateError, match="only a new replica can be seeded"):
        applier.seed({0: path})
    assert applier.list_points() == [point]  # refused before anything changed
    assert b"".join(applier.iter_disk_image(point.point_id, 1)) == _disk_bytes(storage, names[1])


def test_a_seed_cut_short_or_repeated_starts_the_disks_over(tmp_path):
    """A seed whose source fails half-way leaves a replica that does not claim to be
    copied; seeding again (from another image, with zeros where the first had data) leaves
    exactly the new image, nothing of the first. A source larger than its disk is refused
    before anything changes (a file) or as soon as it is seen (pieces)."""
    storage = LocalStorage(str(tmp_path / "storage"))
    rng = random.Random(8)
    item_id, key = uuid.uuid4(), new_key()
    size = 12 * MiB
    applier = _replica(storage, item_id, key, {0: size})
    name = applier.disks[0].name
    first = rng.randbytes(size)

    def failing():
        yield first[: 6 * MiB]
        raise OSError("the original disk went away")

    with pytest.raises(OSError, match="went away"):
        applier.seed({0: failing()})
    assert applier.status().initial_copy_complete is False

    applier.seed({0: [first]})
    assert _disk_bytes(storage, name) == first and applier.status().initial_copy_complete

    second = bytearray(rng.randbytes(size // 2))  # shorter, and zeros where the first had data
    second[MiB : 3 * MiB] = bytes(2 * MiB)
    path = str(tmp_path / "second.img")
    with open(path, "wb") as f:
        f.write(second)
    result = ReplicaApplier(storage, key=key, item_id=item_id, disks={0: DiskSpec(name, size)}).seed({0: path})
    assert _disk_bytes(storage, name) == bytes(second) + bytes(size - len(second))
    assert result.bytes_written[0] == len(second) - 2 * MiB

    too_big = str(tmp_path / "too-big.img")
    with open(too_big, "wb") as f:
        f.truncate(size + 512)
    with pytest.raises(ValueError, match="the image is larger"):
        applier.seed({0: too_big})
    assert _disk_bytes(storage, name) == bytes(second) + bytes(size - len(second))
    assert applier.status().initial_copy_complete
    with pytest.raises(ValueError, match="goes on past"):
        applier.seed({0: [bytes(size), b"x" * 512]})
    with pytest.raises(ValueError, match="has no disk 3"):
        applier.seed({3: path})


def _original_with_differences(source: str, copy: str, rng: random.Random, fraction: float) -> set[int]:
    """Copy ``source`` to ``copy`` and change about ``fraction`` of its 4 KiB blocks there:
    the original disk as it was before the failover. Returns the changed blocks."""
    shutil.copyfile(source, copy)
    blocks = os.path.getsize(source) // 4096
    changed = set(rng.sample(range(blocks), max(1, int(blocks * fraction))))
    with open(copy, "r+b") as f:
        for k in sorted(changed):
            f.seek(k * 4096)
            f.write(rng.randbytes(4096))
    return changed


def _seeded_worker(ps, vault, item_id, sources: dict[int, str]) -> ReplicaWorker:
    """Seed the item's replica in the process server's storage from the originals, then
    start the worker side (apply and digest answers) on it."""
    sizes = {i: os.path.getsize(p) for i, p in sources.items()}
    ReplicaApplier(ps.storage(), key=vault.seal_key, item_id=item_id,
                   disks={i: DiskSpec(f"{item_id}-{i}", s) for i, s in sizes.items()}).seed(sources)
    return ReplicaWorker(ps, vault, item_id, sizes)


def test_a_seeded_item_sends_only_the_blocks_that_differ_from_the_replica(tmp_path, start_ps, vault):
    """Failback: the replica is seeded from the original disks, about 1 % of whose 4 KiB
    blocks differ from the recovered VM's. An agent with no state for the item and a seeded
    assignment compares instead of copying: it sends exactly the differing blocks, flagged
    as a resync (no initial copy), and the replica ends equal to the source; the next
    batch cuts a point. An agent with state for the item ignores the flag."""
    ps = start_ps()
    s0, s1 = 64 * MiB, 8 * MiB
    d0 = make_disk(str(tmp_path / "d0.img"), s0, seed=41)
    d1 = make_disk(str(tmp_path / "d1.img"), s1, seed=42)
    rng = random.Random(43)
    changed = {(0, k) for k in _original_with_differences(d0, str(tmp_path / "o0.img"), rng, 0.01)}
    changed |= {(1, k) for k in _original_with_differences(d1, str(tmp_path / "o1.img"), rng, 0.01)}
    differing = 4096 * len(changed)
    jdir = str(tmp_path / "j0")
    wf = WriteFilter(d0, jdir)
    item_id = uuid.uuid4()
    worker = _seeded_worker(ps, vault, item_id, {0: str(tmp_path / "o0.img"), 1: str(tmp_path / "o1.img")})
    raw = assignment_for(ps, vault, item_id, [(0, d0, jdir), (1, d1, None)], resync=True, seeded=True)
    agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], tick_interval=0)

    status = agent.replicate_until_caught_up(timeout=180)[str(item_id)]
    assert status["phase"] == "delta" and status["pass_done_seq"] == status["acked_seq"]
    assert status["compared_bytes"] == s0 + s1
    assert differing <= status["sent_bytes"] < 3 * differing
    worker.wait_applied(status["acked_seq"])
    batches = worker.since(0)
    assert batches and all(b.flags & wire.FLAG_RESYNC and not b.flags & wire.FLAG_INITIAL for b in batches)
    sent = sum(len(r.data) for b in batches for r in b.records if r.kind == wire.KIND_WRITE)
    assert differing <= sent < 3 * differing and sent < (s0 + s1) // 20
    assert fine_blocks(batches) == sorted(changed)
    worker.assert_matches({0: d0, 1: d1})
    assert worker.applier.list_points() == []  # nothing consistent to point at during the pass
    state = load_item_state(str(tmp_path / "agent"), item_id)
    assert (state.initial_done, state.resync_mode, state.resync_reason) == (True, "replica", "")

    # The replica counts as copied: the first write after the pass makes a point of it.
    wf.write(5 * MiB, rng.randbytes(8192))
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    worker.wait_applied(status["acked_seq"])
    points = worker.applier.list_points()
    assert len(points) == 1 and points[0].seq == status["acked_seq"]
    with open(d0, "rb") as f:
        assert b"".join(worker.applier.iter_disk_image(points[0].point_id, 0)) == f.read()
    agent.close()

    # An agent that has state for the item ignores the flag: nothing is compared or sent again.
    raw["resync"] = False
    agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], tick_interval=0)
    again = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    assert again["acked_seq"] == status["acked_seq"] and again["phase"] == "delta"
    agent.close()
    worker.close()


def test_without_the_flag_a_new_item_is_copied_whole(tmp_path, start_ps, vault):
    """The existing behaviour stays: an agent without the flag makes a full initial copy of a
    new item (here onto a seeded replica), and the replica ends equal to the source."""
    ps = start_ps()
    size = 8 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=51)
    _original_with_differences(disk, str(tmp_path / "o.img"), random.Random(52), 0.01)
    item_id = uuid.uuid4()
    worker = _seeded_worker(ps, vault, item_id, {0: str(tmp_path / "o.img")})
    raw = assignment_for(ps, vault, item_id, [(0, disk, None)])
    assert ItemAssignment.from_dict(raw).seeded is False
    agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], tick_interval=0)
    status = agent.replicate_until_caught_up(timeout=120)[str(item_id)]
    worker.wait_applied(status["acked_seq"])
    batches = worker.since(0)
    flags = [b.flags & ~wire.FLAG_UNFROZEN for b in batches]
    assert flags[-1] == wire.FLAG_INITIAL | wire.FLAG_INITIAL_DONE
    assert all(f == wire.FLAG_INITIAL for f in flags[:-1])
    assert sum(len(r.data) for b in batches for r in b.records if r.kind == wire.KIND_WRITE) >= size
    worker.assert_matches({0: disk})
    agent.close()
    worker.close()


def test_the_flag_without_a_resync_request_is_reported_then_compared_when_asked(
        tmp_path, start_ps, vault, config_server):
    """A seeded item the configuration server does not (yet) ask to resync sends nothing
    and says it needs a resync (it never waits unseen); once asked, it compares with the
    replica and sends only what differs."""
    ps = start_ps()
    size = 4 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=61)
    changed = _original_with_differences(disk, str(tmp_path / "o.img"), random.Random(62), 0.01)
    item_id = uuid.uuid4()
    worker = _seeded_worker(ps, vault, item_id, {0: str(tmp_path / "o.img")})
    stub = config_server()
    jdir = str(tmp_path / "j")
    WriteFilter(disk, jdir)
    stub.items = [assignment_for(ps, vault, item_id, [(0, disk, jdir)], seeded=True)]
    agent = Agent(state_dir=str(tmp_path / "agent"), config_url=stub.url, passphrase=stub.passphrase,
                  machine=machine_for([(0, disk, jdir)]), block_bytes=BLOCK, batch_bytes=MiB, retry=FAST_RETRY,
                  assignment_interval=0, tick_interval=0)
    agent.register()
    status = agent.run_once()[str(item_id)]
    assert status["phase"] == "resync_required" and status["acked_seq"] == 0
    [event] = stub.events_of("resync_required")
    assert "already holds a copy" in event["message"]

    stub.items[0]["resync"] = True
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    assert status["phase"] == "delta" and status["sent_bytes"] == 4096 * len(changed)
    worker.wait_applied(status["acked_seq"])
    assert fine_blocks(worker.since(0)) == sorted((0, k) for k in changed)
    worker.assert_matches({0: disk})
    wait_for(lambda: stub.events_of("resync_complete"), timeout=10, what="resync_complete")
    agent.close()
    worker.close()


def test_the_seeded_flag_travels_in_the_assignment():
    raw = {"item_id": str(uuid.uuid4()), "item_token": "t", "process_server_url": "https://ps",
           "process_server_thumbprint": "ab", "disks": [{"index": 0, "path": "/dev/sda"}]}
    assert ItemAssignment.from_dict(raw).seeded is False
    item = ItemAssignment.from_dict({**raw, "seeded": True, "resync": True})
    assert item.seeded and ItemAssignment.from_dict(item.to_dict()).seeded
    assert item == ItemAssignment.from_dict(raw)  # not part of the item's identity
