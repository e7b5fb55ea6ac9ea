"""The mobility agent with disks that change shape, against a real process server process and
the real apply engine: a journaled and a scanned disk grow, a disk is added (its own full
copy; the others are not sent again), a disk is removed (announced, retired by apply). Ends
with every replica disk compared byte for byte with its source, at the source's size."""
from __future__ import annotations

import os
import random
import uuid

from mobility.filter import WriteFilter
from replication.dataplane import batch as batch_format
from replication.dataplane.apply import DiskSpec, ReplicaApplier

try:
    from tests.dataplane.fixtures_ps import MiB, config_server, make_disk, start_ps, vault  # noqa: F401 - fixtures
    from tests.dataplane.test_agent import ReplicaWorker, item_for, random_writes, small_agent
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import MiB, config_server, make_disk, start_ps, vault  # type: ignore[no-redef]  # noqa: F401
    from test_agent import ReplicaWorker, item_for, random_writes, small_agent  # type: ignore[no-redef]


def _grow(path: str, size: int, rng: random.Random, *, fill_from: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.seek(fill_from)
        f.write(rng.randbytes(size - fill_from))


def _reassign(agent, ps, vault, item_id, disks) -> None:
    """What fetching a new assignment does (this agent's assignment is fixed)."""
    agent._assignment = [item_for(ps, vault, item_id, disks)]


def _written(batches, disk: int) -> int:
    return sum(len(r.data) for b in batches for r in b.records if r.kind == batch_format.KIND_WRITE and r.disk == disk)


def test_disks_that_grow_are_added_and_removed_replicate_without_reseeding(tmp_path, start_ps, vault):  # noqa: F811
    ps = start_ps()
    rng = random.Random(12)
    d0 = make_disk(str(tmp_path / "d0.img"), 2 * MiB, seed=1)  # journaled
    d1 = make_disk(str(tmp_path / "d1.img"), MiB, seed=2)  # scanned
    j0 = str(tmp_path / "j0")
    wf = WriteFilter(d0, j0)
    item_id = uuid.uuid4()
    agent = small_agent(tmp_path / "agent", [item_for(ps, vault, item_id, [(0, d0, j0), (1, d1, None)])],
                        scan_interval=0)
    worker = ReplicaWorker(ps, vault, item_id, {0: 2 * MiB, 1: MiB})
    try:
        before = agent.replicate_until_caught_up(timeout=120)[str(item_id)]["acked_seq"]
        worker.wait_applied(before)
        worker.assert_matches({0: d0, 1: d1})

        # disk 0 grows to 3 MiB and the guest writes past its old end (through the journal);
        # disk 1 grows to 2 MiB with data in the new space; disk 2 (1 MiB) is added
        _grow(d0, 3 * MiB, rng, fill_from=3 * MiB)  # (the new space reads as zeros)
        wf.write(2 * MiB + 8192, rng.randbytes(64 * 1024))
        random_writes(wf, 3 * MiB, 20, rng)
        _grow(d1, 2 * MiB, rng, fill_from=MiB + 4096)
        d2 = make_disk(str(tmp_path / "d2.img"), MiB, seed=3)
        with worker.lock:  # the vault made the new replica disk's row: the applier knows its name
            worker.names[2] = f"{item_id}-2"
            worker.applier = ReplicaApplier(worker.storage, key=vault.seal_key, item_id=item_id, disks={
                i: DiskSpec(worker.names[i], s) for i, s in {0: 2 * MiB, 1: MiB, 2: MiB}.items()})
        _reassign(agent, ps, vault, item_id, [(0, d0, j0), (1, d1, None), (2, d2, None)])
        status = agent.replicate_until_caught_up(timeout=120)[str(item_id)]
        worker.wait_applied(status["acked_seq"])
        worker.assert_matches({0: d0, 1: d1, 2: d2})
        assert worker.applier.disk_sizes() == {0: 3 * MiB, 1: 2 * MiB, 2: MiB}
        after = worker.since(before)
        disk_records = [(r.disk, r.offset) for b in after for r in b.records if r.kind == batch_format.KIND_DISK]
        assert sorted(disk_records) == [(0, 3 * MiB), (1, 2 * MiB), (2, MiB)]
        assert _written(after, 2) >= MiB  # the added disk's full copy
        assert _written(after, 0) < MiB  # disk 0: only its writes, never its 2 MiB again
        assert _written(after, 1) <= MiB + 64 * 1024  # disk 1: its new space, not its old MiB
        assert status["total_bytes"] == MiB and status["phase"] == "delta"  # the last pass: disk 2 only

        # disk 1 leaves the machine: announced with size 0, retired by apply; the others go on
        mark = status["acked_seq"]
        _reassign(agent, ps, vault, item_id, [(0, d0, j0), (2, d2, None)])
        random_writes(wf, 3 * MiB, 10, rng)
        with open(d2, "r+b") as f:
            f.seek(4096)
            f.write(os.urandom(8192))
        status = agent.replicate_until_caught_up(timeout=120)[str(item_id)]
        worker.wait_applied(status["acked_seq"])
        assert [(r.disk, r.offset) for b in worker.since(mark) for r in b.records
                if r.kind == batch_format.KIND_DISK] == [(1, 0)]
        assert worker.applier.disk_sizes() == {0: 3 * MiB, 2: MiB}
        worker.assert_matches({0: d0, 2: d2})
    finally:
        wf.close()
        agent.close()
        worker.close()


def test_a_disk_that_shrank_is_resynchronized_at_its_new_size(tmp_path, start_ps, vault):  # noqa: F811
    """vSphere never shrinks a disk; if one appears smaller anyway, the agent asks for a full
    resynchronization, whose pass announces every disk's size before comparing."""
    ps = start_ps()
    d0 = make_disk(str(tmp_path / "d0.img"), 2 * MiB, seed=4)
    item_id = uuid.uuid4()
    agent = small_agent(tmp_path / "agent", [item_for(ps, vault, item_id, [(0, d0, None)])], scan_interval=0,
                        auto_resync=True)
    worker = ReplicaWorker(ps, vault, item_id, {0: 2 * MiB})
    try:
        before = agent.replicate_until_caught_up(timeout=120)[str(item_id)]["acked_seq"]
        worker.wait_applied(before)
        with open(d0, "r+b") as f:
            f.truncate(MiB + 64 * 1024)
            f.seek(4096)
            f.write(os.urandom(4096))
        status = agent.replicate_until_caught_up(timeout=120)[str(item_id)]
        assert status["phase"] == "delta" and status["total_bytes"] == MiB + 64 * 1024  # a full pass at the new size
        worker.wait_applied(status["acked_seq"])
        assert worker.applier.disk_sizes() == {0: MiB + 64 * 1024}
        assert [(r.disk, r.offset) for b in worker.since(before) for r in b.records
                if r.kind == batch_format.KIND_DISK] == [(0, MiB + 64 * 1024)]
        worker.assert_matches({0: d0})
    finally:
        agent.close()
        worker.close()
