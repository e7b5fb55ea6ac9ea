"""The mobility agent against a real process server process and real local storage.

The configuration server is the one stand-in (``ConfigServerStub``, a test double of its
agent API; the Django side has its own tests and needs a database these tests do not).
"""
from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mobility import checksum_pass
from mobility import filter as journal
from mobility import wire
from mobility.agent import Agent, AgentError, DiskAssignment, ItemAssignment, load_item_state, write_request
from mobility.blockmap import BlockMap, changed_blocks, map_path
from mobility.filter import WriteFilter
from mobility.transport import RetryPolicy, TransportError
from replication.dataplane import batch as batch_format
from replication.dataplane import digests, process_server, sealing
from replication.dataplane.apply import DiskSpec, ReplicaApplier

try:
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        MiB, AnswerDroppingProxy, assignment_for, config_server, https_request, machine_for, make_disk, replay,
        sha256_file, start_ps, stored_batches, stored_seqs, vault, wait_for, zero_image,
    )
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        MiB, AnswerDroppingProxy, assignment_for, config_server, https_request, machine_for, make_disk, replay,
        sha256_file, start_ps, stored_batches, stored_seqs, vault, wait_for, zero_image,
    )

BLOCK = 64 * 1024
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_agent(state_dir, items, **kw) -> Agent:
    kw.setdefault("block_bytes", BLOCK)
    kw.setdefault("batch_bytes", 1 * MiB)
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("scan_interval", 3600)
    return Agent(state_dir=str(state_dir), assignment=items, **kw)


def item_for(ps, vault, item_id, disks) -> ItemAssignment:
    return ItemAssignment.from_dict(assignment_for(ps, vault, item_id, disks))


def uploaded(ps, vault, item_id, acked_seq):
    storage = ps.storage()
    wait_for(lambda: len(stored_seqs(storage, item_id)) >= acked_seq, timeout=60, what="uploads")
    batches = stored_batches(storage, item_id, vault.seal_key)
    assert [b.seq for b in batches] == list(range(1, acked_seq + 1)), "stored logs are not exactly 1..acked"
    return batches


def assert_replica_matches(tmp_path, batches, disks: dict[int, str]):
    images = {i: zero_image(str(tmp_path / f"replica-{i}.img"), os.path.getsize(p)) for i, p in disks.items()}
    replay(batches, images)
    for i, p in disks.items():
        assert sha256_file(images[i]) == sha256_file(p), f"replica of disk {i} differs from the source"


class ReplicaWorker:
    """Plays the Celery worker's part for one item, with the real data plane: applies the
    item's logs from the process server's storage to replica disks there
    (``ReplicaApplier``), keeping every batch it applied (``batches``, by seq), and answers
    the replica-digest requests (``digests.digest_request_answer``) as ``engine.item_apply``
    does for a resynchronizing item. Runs in a background thread."""

    def __init__(self, ps, vault, item_id: uuid.UUID, sizes: dict[int, int]) -> None:
        self.storage = ps.storage()
        self.item_id = item_id
        self.seal_key = vault.seal_key
        self.names = {i: f"{item_id}-{i}" for i in sizes}
        self.applier = ReplicaApplier(self.storage, key=vault.seal_key, item_id=item_id,
                                      disks={i: DiskSpec(self.names[i], size) for i, size in sizes.items()})
        self.batches: dict[int, batch_format.Batch] = {}
        self.plain: dict[int, bytes] = {}
        self.answered = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def applied_seq(self) -> int:
        return self.applier.status().applied_seq

    def _step(self) -> None:
        with self.lock:
            applied = self.applied_seq
            seqs = sorted(s for s in stored_seqs(self.storage, self.item_id) if s > applied)
            n = 0
            for seq in seqs:
                if seq != applied + n + 1:
                    break
                if seq not in self.batches:
                    sealed = self.storage.get_object(process_server.object_key(self.item_id, seq))
                    plain = sealing.unseal(sealed, key=self.seal_key,
                                           context=process_server.seal_context(self.item_id, seq))
                    self.plain[seq], self.batches[seq] = plain, batch_format.decode(plain)
                n += 1
            if n:
                result = self.applier.apply_pending(crash_consistent_interval_s=3600, max_batches=n)
                assert not result.errors, result.errors
            if digests.digest_request_answer(self.storage, item_id=self.item_id, disks=self.names,
                                             applied_seq=self.applied_seq):
                self.answered += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except BaseException as e:  # reported by the test, not lost in a thread
                self.error = e
                return
            self._stop.wait(0.02)

    def wait_applied(self, seq: int) -> None:
        """Until a pass has applied ``seq`` and ended: read between passes, as a pass saves
        its applied seq before the point it cuts there."""
        def applied() -> int:
            with self.lock:
                return self.applied_seq

        wait_for(lambda: self.error is not None or applied() >= seq, timeout=60, what=f"apply of seq {seq}")
        assert self.error is None, self.error

    def flip(self, disk: int, offset: int, data: bytes) -> None:
        """Change the replica behind Lifeboat's back (while no apply runs)."""
        with self.lock:
            self.storage.write_disk(self.names[disk], offset, data)
            self.storage.flush_disk(self.names[disk])

    def assert_matches(self, disks: dict[int, str]) -> None:
        with self.lock:
            for i, path in disks.items():
                with open(path, "rb") as f:
                    source = f.read()
                replica = self.storage.read_disk(self.names[i], 0, len(source))
                assert replica == source, f"the replica of disk {i} differs from the source"

    def since(self, seq: int) -> list[batch_format.Batch]:
        return [self.batches[s] for s in sorted(self.batches) if s > seq]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert self.error is None, self.error


def fine_blocks(batches) -> list[tuple[int, int]]:
    """The (disk, 4 KiB block) pairs the batches' writes cover, sorted, each once."""
    out = set()
    for b in batches:
        for r in b.records:
            if r.kind == batch_format.KIND_WRITE:
                assert r.offset % 4096 == 0
                out.update((r.disk, k) for k in range(r.offset // 4096, -(-(r.offset + len(r.data)) // 4096)))
    return sorted(out)


def random_writes(wf: WriteFilter, size: int, n: int, rng: random.Random, *, max_len: int = 16 * 1024):
    for _ in range(n):
        length = 512 * rng.randint(1, max_len // 512)
        offset = 512 * rng.randrange(0, (size - length) // 512)
        wf.write(offset, rng.randbytes(length))


def test_the_batch_format_is_defined_once_and_agent_batches_decode_on_the_data_plane():
    """The data plane's batch module takes the format from the agent's (one definition), and
    what the agent encodes as pieces, the data plane decodes, whole or streamed, to the same
    records; bad records are refused by the same rule on both sides."""
    for name in ("MAGIC", "VERSION", "HEADER", "RECORD", "SECTOR", "KIND_WRITE", "KIND_BOOKMARK", "KIND_DISK",
                 "FLAG_INITIAL", "FLAG_INITIAL_DONE", "FLAG_RESYNC", "FLAG_UNFROZEN", "FLAG_FROZEN_END",
                 "MAX_BATCH_BYTES", "MAX_BOOKMARK_BYTES", "MAX_DISKS", "Record", "MalformedBatch"):
        assert getattr(batch_format, name) is getattr(wire, name), name
    rng = random.Random(3)
    for _ in range(50):
        item_id = uuid.uuid4()
        recs = [(wire.KIND_WRITE, rng.randint(0, 5), 512 * rng.randint(0, 100), rng.randbytes(512 * rng.randint(1, 4)))
                for _ in range(rng.randint(0, 6))]
        if rng.random() < 0.3:
            recs.insert(0, (wire.KIND_DISK, rng.randint(0, 5), 512 * rng.randint(0, 100), b""))
        if rng.random() < 0.5:
            recs.append((wire.KIND_BOOKMARK, 0, 0, b'{"id":"x"}'))
        flags = rng.choice([0, 1, 3, 4, 8, 0x10])
        ours = wire.encode(item_id=item_id, seq=rng.randint(1, 99), source_time_ns=rng.randint(0, 2**60),
                           records=[wire.Record(*r) for r in recs], flags=flags)
        whole = b"".join(bytes(p) for p in ours.parts)
        assert len(whole) == ours.size == wire.encoded_size([wire.Record(*r) for r in recs])
        batch = batch_format.decode(whole)
        assert (batch.item_id, batch.seq, batch.flags) == (item_id, ours.seq, flags)
        assert [(r.kind, r.disk, r.offset, bytes(r.data)) for r in batch.records] == recs
        streamed = batch_format.StreamValidator()
        for part in ours.parts:
            streamed.feed(part)
        assert streamed.finish().record_count == len(recs)
        assert batch_format.encode(item_id=item_id, seq=ours.seq, source_time_ns=batch.source_time_ns,
                                   records=[batch_format.Record(*r) for r in recs], flags=flags) == whole
    with pytest.raises(batch_format.MalformedBatch, match="not 512-byte aligned"):
        wire.encode(item_id=uuid.uuid4(), seq=1, source_time_ns=0, records=[wire.Record(wire.KIND_WRITE, 0, 100, bytes(512))])


def test_registration_assignment_and_heartbeat(tmp_path, config_server):
    stub = config_server(tls_dir=str(tmp_path / "stub-tls"))
    stub.items = [{"item_id": str(uuid.uuid4()), "item_token": "t", "process_server_url": "https://127.0.0.1:9443",
                   "process_server_thumbprint": "ab" * 32,
                   "disks": [{"index": 0, "key": "2000", "path": "/dev/sdb", "journal_dir": None}]}]
    machine = {"name": "vm-01", "os": "Linux", "disks": [{"key": 2000, "path": "/dev/sdb", "capacity_bytes": 1 << 30}]}
    state = tmp_path / "agent"
    agent = Agent(state_dir=str(state), config_url=stub.url, passphrase=stub.passphrase, machine=machine,
                  hostname="host-01", config_thumbprint=stub.thumbprint, retry=FAST_RETRY)
    assert agent.register() == stub.agent_id
    assert stub.registrations == [{"passphrase": stub.passphrase, "hostname": "host-01", "machine": machine,
                                   "version": "1.0"}]
    creds = state / "credentials.json"
    assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
    assert json.loads(creds.read_text())["token"] == stub.token
    assert Agent(state_dir=str(state), config_url=stub.url, config_thumbprint=stub.thumbprint).register() == stub.agent_id
    assert len(stub.registrations) == 1  # kept, not registered twice

    items = agent.fetch_assignment()
    assert [str(i.item_id) for i in items] == [stub.items[0]["item_id"]]
    assert items[0].disks[0] == DiskAssignment(0, "2000", "/dev/sdb", None)
    get = [c for c in stub.calls if c[0] == "GET"][-1]
    assert get[1] == f"/api/v1/agents/{stub.agent_id}/assignment" and get[2]["Authorization"] == f"Bearer {stub.token}"
    assert stat.S_IMODE(os.stat(state / "assignment.json").st_mode) == 0o600

    agent.send_heartbeat()
    beat = stub.heartbeats[-1]
    assert beat["version"] == "1.0" and beat["items"][0]["item_id"] == stub.items[0]["item_id"]
    assert {"phase", "backlog_bytes", "acked_seq", "progress"} <= set(beat["items"][0])


def test_registration_refusal_is_clear(tmp_path, config_server):
    stub = config_server()
    agent = Agent(state_dir=str(tmp_path / "a"), config_url=stub.url, passphrase="wrong",
                  machine={"name": "x", "disks": []}, retry=FAST_RETRY)
    with pytest.raises(TransportError, match="passphrase is not that of any vault") as e:
        agent.register()
    assert not e.value.transient
    assert not os.path.exists(tmp_path / "a" / "credentials.json")


def test_initial_and_delta_replication_is_byte_exact(tmp_path, start_ps, vault):
    """Writes keep coming during the initial copy: the journal from the start of protection
    follows the copy, and the replica ends equal to the source."""
    ps = start_ps()
    size = 12 * MiB
    d0 = make_disk(str(tmp_path / "d0.img"), size, seed=1)
    d1 = make_disk(str(tmp_path / "d1.img"), 4 * MiB, seed=2)
    wf = WriteFilter(d0, str(tmp_path / "j0"))
    item_id = uuid.uuid4()
    agent = small_agent(tmp_path / "agent", [item_for(ps, vault, item_id, [(0, d0, str(tmp_path / "j0")),
                                                                          (1, d1, None)])])
    stop = threading.Event()
    rng = random.Random(7)

    def writer():
        while not stop.is_set():
            random_writes(wf, size, 5, rng)
            time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    try:
        agent.run_once()
    finally:
        stop.set()
        t.join()
    random_writes(wf, size, 200, rng)
    status = agent.replicate_until_caught_up(timeout=120)[str(item_id)]
    assert (status["phase"], status["backlog_bytes"], status["progress"]) == ("delta", 0, 1.0)
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    # Blocks of the disk without a journal were read from the live disk: their batches say so.
    scanned = [b for b in batches if any(r.disk == 1 and r.kind == batch_format.KIND_WRITE for r in b.records)]
    assert scanned and all(b.flags & batch_format.FLAG_UNFROZEN for b in scanned)
    flags = [b.flags & ~batch_format.FLAG_UNFROZEN for b in batches]
    done = flags.index(batch_format.FLAG_INITIAL | batch_format.FLAG_INITIAL_DONE)
    assert all(f == batch_format.FLAG_INITIAL for f in flags[:done]) and all(f == 0 for f in flags[done + 1:])
    copy_bytes = sum(len(r.data) for b in batches[:done + 1] for r in b.records if r.kind == batch_format.KIND_WRITE)
    assert copy_bytes >= size + 4 * MiB  # every block of both disks was copied
    assert_replica_matches(tmp_path, batches, {0: d0, 1: d1})
    assert journal.journal_bytes(str(tmp_path / "j0")) <= journal.SEGMENT_BYTES + 64 * 1024  # acked segments dropped
    agent.close()


def test_bookmark_is_the_last_record_after_every_earlier_write(tmp_path, start_ps, vault):
    ps = start_ps()
    size = 4 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size)
    jdir = str(tmp_path / "j")
    wf = WriteFilter(disk, jdir)
    item_id = uuid.uuid4()
    agent = small_agent(tmp_path / "agent", [item_for(ps, vault, item_id, [(0, disk, jdir)])])
    agent.replicate_until_caught_up(timeout=60)
    rng = random.Random(1)
    random_writes(wf, size, 150, rng)
    bookmark_id = agent.request_bookmark(item_id, "sql-quiesced")
    random_writes(wf, size, 150, rng)  # after the bookmark
    write_request(str(tmp_path / "agent"), "bookmark", str(item_id), "from the command line")
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    marked = [(i, b) for i, b in enumerate(batches) for r in b.records if r.kind == batch_format.KIND_BOOKMARK]
    assert len(marked) == 2
    for _i, b in marked:
        assert b.records[-1].kind == batch_format.KIND_BOOKMARK
        assert sum(r.kind == batch_format.KIND_BOOKMARK for r in b.records) == 1
    first_at, first = marked[0]
    label = json.loads(bytes(first.records[-1].data))
    assert (label["id"], label["label"]) == (bookmark_id, "sql-quiesced")
    assert json.loads(bytes(marked[1][1].records[-1].data))["label"] == "from the command line"
    # exactly the journaled writes up to the request come before the first bookmark
    writes_before = sum(1 for b in batches[: first_at + 1] if not b.flags for r in b.records
                        if r.kind == batch_format.KIND_WRITE)
    assert writes_before == 150
    assert_replica_matches(tmp_path, batches, {0: disk})
    agent.close()


def test_assigned_bookmarks_are_taken_once(tmp_path, start_ps, vault, config_server):
    ps = start_ps()
    disk = make_disk(str(tmp_path / "d.img"), 2 * MiB)
    jdir = str(tmp_path / "j")
    wf = WriteFilter(disk, jdir)
    item_id = uuid.uuid4()
    stub = config_server()
    stub.items = [assignment_for(ps, vault, item_id, [(0, disk, jdir)])]
    agent = Agent(state_dir=str(tmp_path / "agent"), config_url=stub.url, passphrase=stub.passphrase,
                  machine=machine_for([(0, disk, jdir)]), block_bytes=BLOCK, batch_bytes=MiB, retry=FAST_RETRY,
                  assignment_interval=0)
    agent.register()
    agent.replicate_until_caught_up(timeout=60)
    random_writes(wf, 2 * MiB, 20, random.Random(2))
    # the configuration server quiesced the VM and noted where the journal stood
    stub.items[0]["bookmarks"] = [{"id": "b-1", "label": "hourly", "positions": {"0": journal.last_seq(jdir)}}]
    random_writes(wf, 2 * MiB, 20, random.Random(3))
    for _ in range(3):  # it keeps listing the bookmark until the recovery point exists
        status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    labels = [json.loads(bytes(r.data)) for b in batches for r in b.records if r.kind == batch_format.KIND_BOOKMARK]
    assert [(x["id"], x["label"]) for x in labels] == [("b-1", "hourly")]
    at = next(i for i, b in enumerate(batches) if b.records and b.records[-1].kind == batch_format.KIND_BOOKMARK)
    after_initial = next(i for i, b in enumerate(batches) if b.flags & batch_format.FLAG_INITIAL_DONE) + 1
    assert sum(len(b.records) for b in batches[after_initial : at + 1]) == 20 + 1  # the writes before it, then it
    agent.close()


def test_checksum_scan_finds_exactly_the_changed_blocks(tmp_path, start_ps, vault):
    ps = start_ps()
    size = 4 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=4)
    item_id = uuid.uuid4()
    agent = small_agent(tmp_path / "agent", [item_for(ps, vault, item_id, [(0, disk, None)])])
    first = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    with open(disk, "r+b") as f:
        for block in (3, 17, 60):
            f.seek(block * BLOCK + 1024)
            f.write(os.urandom(4096))
        f.seek(9 * BLOCK)
        same = f.read(BLOCK)
        f.seek(9 * BLOCK)
        f.write(same)  # rewritten with identical bytes: not a change
    bmap = BlockMap(map_path(str(tmp_path / "agent" / "items" / str(item_id)), 0), blocks=size // BLOCK)
    assert changed_blocks(disk, bmap, block_bytes=BLOCK) == [3, 17, 60]
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    sent = [(r.disk, r.offset, len(r.data)) for b in batches[first:] for r in b.records]
    assert sent == [(0, 3 * BLOCK, BLOCK), (0, 17 * BLOCK, BLOCK), (0, 60 * BLOCK, BLOCK)]
    assert_replica_matches(tmp_path, batches, {0: disk})
    agent.close()


def test_a_block_map_of_another_digest_is_dropped_and_every_block_sent_again(tmp_path, start_ps, vault):
    """An older agent's map (SHA-256, ``blockmap-N.bin``) is never compared with today's
    digests: it is removed, every block counts as unknown and the next scan sends each once."""
    ps = start_ps()
    size = 2 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=6)
    item_id = uuid.uuid4()
    items = [item_for(ps, vault, item_id, [(0, disk, None)])]
    agent = small_agent(tmp_path / "agent", items)
    first = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    again = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    assert again == first  # a scan of an unchanged disk sends nothing
    agent.close()
    item_dir = tmp_path / "agent" / "items" / str(item_id)
    assert sorted(p.name for p in item_dir.glob("blockmap-*")) == ["blockmap-0.blake3"]
    os.rename(item_dir / "blockmap-0.blake3", item_dir / "blockmap-0.bin")

    agent = small_agent(tmp_path / "agent", items)
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    agent.close()
    assert sorted(p.name for p in item_dir.glob("blockmap-*")) == ["blockmap-0.blake3"]
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    sent = sorted(r.offset for b in batches[first:] for r in b.records)
    assert sent == [block * BLOCK for block in range(size // BLOCK)]
    assert_replica_matches(tmp_path, batches, {0: disk})


def test_journal_overflow_is_reported_and_a_resync_repairs_the_replica(tmp_path, start_ps, vault, config_server):
    ps = start_ps()
    size = 4 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=5)
    jdir = str(tmp_path / "j")
    item_id = uuid.uuid4()
    stub = config_server()
    stub.items = [assignment_for(ps, vault, item_id, [(0, disk, jdir)])]
    wf = WriteFilter(disk, jdir, cap_bytes=256 * 1024, segment_bytes=32 * 1024)
    agent = Agent(state_dir=str(tmp_path / "agent"), config_url=stub.url, passphrase=stub.passphrase,
                  machine=machine_for([(0, disk, jdir)]), block_bytes=BLOCK, batch_bytes=MiB, retry=FAST_RETRY,
                  assignment_interval=0)
    agent.register()
    worker = ReplicaWorker(ps, vault, item_id, {0: size})
    acked = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    touched = set()
    rng = random.Random(9)
    for _ in range(120):  # 120 x 4 KiB: well over the 256 KiB journal cap
        offset = 4096 * rng.randrange(size // 4096)
        wf.write(offset, rng.randbytes(4096))
        touched.add((0, offset // 4096))
    assert journal.overflowed(jdir)
    for _ in range(2):
        status = agent.run_once()[str(item_id)]
        assert status["phase"] == "resync_required" and "overflowed" in status["resync_reason"]
        assert status["acked_seq"] == acked  # nothing is shipped while the item waits for its resync
    [event] = stub.events_of("resync_required")  # reported once
    assert event["item_id"] == str(item_id) and "overflowed" in event["message"]

    stub.items[0]["resync"] = True  # the configuration server moves the item to RESYNCING
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    assert status["phase"] == "delta" and not journal.overflowed(jdir)
    worker.wait_applied(status["acked_seq"])
    resync = [b for b in worker.since(acked) if b.flags & batch_format.FLAG_RESYNC]
    assert resync, "no batch flagged FLAG_RESYNC"
    assert fine_blocks(resync) == sorted(touched)  # only the 4 KiB blocks that changed
    worker.assert_matches({0: disk})
    wait_for(lambda: stub.events_of("resync_complete"), timeout=10, what="resync_complete")

    # the flag may stay up until the configuration server has seen the resync through:
    # it is not taken twice; journaling and delta replication go on
    random_writes(wf, size, 10, rng, max_len=8192)
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    worker.wait_applied(status["acked_seq"])
    assert sum(1 for b in worker.since(0) if b.flags & batch_format.FLAG_RESYNC) == len(resync)
    worker.assert_matches({0: disk})
    worker.close()
    agent.close()


def test_a_lost_ack_is_resent_without_duplicating_data(tmp_path, start_ps, vault):
    ps = start_ps()
    proxy = AnswerDroppingProxy(ps.port)
    try:
        disk = make_disk(str(tmp_path / "d.img"), 6 * MiB)
        item_id = uuid.uuid4()
        raw = assignment_for(ps, vault, item_id, [(0, disk, None)])
        raw["process_server_url"] = f"https://127.0.0.1:{proxy.port}"
        agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], window=1)
        proxy.armed = 2
        status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
        assert proxy.dropped == 2
        batches = uploaded(ps, vault, item_id, status["acked_seq"])  # 1..acked, each exactly once
        assert sum(len(r.data) for b in batches for r in b.records) == 6 * MiB
        assert_replica_matches(tmp_path, batches, {0: disk})
        agent.close()
    finally:
        proxy.close()


def test_a_planned_batch_is_resent_by_a_restarted_agent(tmp_path, start_ps, vault):
    """The process server goes away with a batch planned; the agent process is replaced;
    the new one resends the same seq with the same bytes and the backlog drains."""
    ps = start_ps()
    size = 2 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size)
    jdir = str(tmp_path / "j")
    wf = WriteFilter(disk, jdir)
    item_id = uuid.uuid4()
    items = [item_for(ps, vault, item_id, [(0, disk, jdir)])]
    agent = small_agent(tmp_path / "agent", items)
    acked = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    random_writes(wf, size, 100, random.Random(5))
    ps.kill()
    status = agent.run_once()[str(item_id)]
    assert "failed" in status["last_error"] and status["backlog_bytes"] > 0
    state = load_item_state(str(tmp_path / "agent"), item_id)
    assert [p["seq"] for p in state.inflight] == [acked + 1]
    agent.close()

    ps.start()
    items = [item_for(ps, vault, item_id, [(0, disk, jdir)])]
    agent = small_agent(tmp_path / "agent", items)
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    assert status["backlog_bytes"] == 0
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    assert_replica_matches(tmp_path, batches, {0: disk})
    agent.close()


def test_a_process_server_with_another_certificate_is_refused(tmp_path, start_ps, vault):
    ps = start_ps()
    disk = make_disk(str(tmp_path / "d.img"), 1 * MiB)
    item_id = uuid.uuid4()
    raw = assignment_for(ps, vault, item_id, [(0, disk, None)])
    raw["process_server_thumbprint"] = "0" * 64
    agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)])
    status = agent.run_once()[str(item_id)]
    assert "thumbprint" in status["last_error"] and "refusing" in status["last_error"]
    answer = https_request(ps.port, "GET", f"/v1/items/{item_id}",
                           headers={"Authorization": f"Bearer {vault.item_token(item_id)}"})
    assert answer.body["acked_seq"] == 0
    agent.close()


def test_retries_are_bounded_with_jittered_backoff():
    policy = RetryPolicy(max_attempts=5, base_delay=0.1, max_delay=0.5)
    delays = [policy.delay(a) for a in range(1, 200)]
    assert all(0 <= d <= 0.5 for d in delays)
    assert len({round(d, 6) for d in delays}) > 150  # jittered, not a fixed schedule
    assert max(policy.delay(1) for _ in range(200)) <= 0.2  # grows from base * 2

    slept, calls = [], []

    def flaky():
        calls.append(1)
        raise TransportError("connection refused", transient=True)

    with pytest.raises(TransportError):
        policy.run(flaky, sleep=slept.append)
    assert len(calls) == 5 and len(slept) == 4

    calls.clear()

    def refused():
        calls.append(1)
        raise TransportError("403 forbidden", transient=False)

    with pytest.raises(TransportError):
        policy.run(refused, sleep=slept.append)
    assert len(calls) == 1  # a permanent error is not retried


def test_agent_rejects_an_unusable_setup(tmp_path):
    with pytest.raises(AgentError):
        Agent(state_dir=str(tmp_path), block_bytes=1000)
    with pytest.raises(AgentError, match="malformed"):
        ItemAssignment.from_dict({"item_id": "not a uuid"})


def test_command_line_registers_and_queues_requests(tmp_path, config_server):
    stub = config_server()
    disk = make_disk(str(tmp_path / "d.img"), 1 * MiB)
    state = str(tmp_path / "agent")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mobility", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=60, cwd=ROOT)
    secret = tmp_path / "passphrase"
    secret.write_text(stub.passphrase + "\n")
    out = run("register", "--state-dir", state, "--config-url", stub.url, "--passphrase-file", str(secret),
              "--instance-uuid", "4201-aa", "--disk", f"0={disk}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == stub.agent_id
    assert stub.registrations[0]["machine"]["disks"] == [{"key": 0, "path": disk, "capacity_bytes": MiB}]
    assert stub.registrations[0]["machine"]["instance_uuid"] == "4201-aa"
    item = str(uuid.uuid4())
    out = run("bookmark", "--state-dir", state, "--item", item, "--label", "pre-upgrade")
    assert out.returncode == 0 and os.path.exists(out.stdout.strip())
    out = run("status", "--state-dir", state)
    assert out.returncode == 0 and json.loads(out.stdout) == []
    bad = run("register", "--state-dir", state, "--config-url", stub.url, "--passphrase-file", str(secret),
              "--disk", "zero")
    assert bad.returncode == 1 and "KEY=PATH" in bad.stderr


def test_write_filter_journal_positions_and_overflow(tmp_path):
    disk = make_disk(str(tmp_path / "d.img"), 1 * MiB)
    jdir = str(tmp_path / "j")
    wf = WriteFilter(disk, jdir, cap_bytes=64 * 1024, segment_bytes=8 * 1024)
    for n in range(10):
        wf.write(4096 * n, bytes([n]) * 2048)
    records = list(journal.read_journal(jdir))
    assert [r.seq for r in records] == list(range(1, 11))
    assert len(journal.list_segments(jdir)) > 1
    # resuming at a record's position gives exactly the records after it
    fifth = records[4]
    assert [r.seq for r in journal.read_journal(jdir, after_seq=5, position=(fifth.segment, fifth.end))] == list(
        range(6, 11))
    assert journal.end_position(jdir) == (10, (records[-1].segment, records[-1].end))
    assert journal.end_position(jdir, start=(5, (fifth.segment, fifth.end))) == journal.end_position(jdir)
    assert journal.backlog_bytes(jdir, (records[-1].segment, records[-1].end)) == 0
    journal.drop_segments_through(jdir, acked_seq=10)
    assert len(journal.list_segments(jdir)) == 1  # the newest stays: the filter may append to it
    for n in range(40):  # past the cap
        wf.write(0, b"x" * 4096)
    assert journal.overflowed(jdir)
    last = journal.last_seq(jdir)
    wf.write(0, b"y" * 512)  # not journaled while overflowed, but on the disk
    assert journal.last_seq(jdir) == last
    with open(disk, "rb") as f:
        assert f.read(512) == b"y" * 512
    journal.drop_segments_through(jdir, acked_seq=last)
    journal.clear_overflow(jdir)
    wf.write(512, b"z" * 512)  # journaling resumes in a fresh segment, with the next seq
    assert [r.seq for r in journal.read_journal(jdir, after_seq=last)] == [last + 1]
    journal.drop_segments_through(jdir, acked_seq=last + 1)
    assert journal.journal_bytes(jdir) < 2048  # the stale segment could go
    wf.close()
    reopened = WriteFilter(disk, jdir)  # a restarted filter continues the seqs
    reopened.write(0, b"w" * 512)
    assert journal.last_seq(jdir) == last + 2
    reopened.close()


def test_unaligned_writes_are_shipped_as_whole_sectors(tmp_path, start_ps, vault):
    ps = start_ps()
    disk = make_disk(str(tmp_path / "d.img"), 1 * MiB)
    jdir = str(tmp_path / "j")
    wf = WriteFilter(disk, jdir)
    item_id = uuid.uuid4()
    agent = small_agent(tmp_path / "agent", [item_for(ps, vault, item_id, [(0, disk, jdir)])])
    agent.replicate_until_caught_up(timeout=60)
    wf.write(100, b"a" * 1000)
    wf.write(70000, b"b" * 3)
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    last = [(r.offset, len(r.data)) for r in batches[-1].records]
    assert last == [(0, 1536), (69632, 512)]
    assert_replica_matches(tmp_path, batches, {0: disk})
    agent.close()


def test_overflow_during_the_initial_copy_starts_it_over(tmp_path, start_ps, vault):
    ps = start_ps()
    proxy = AnswerDroppingProxy(ps.port)
    try:
        size = 8 * MiB
        disk = make_disk(str(tmp_path / "d.img"), size)
        jdir = str(tmp_path / "j")
        wf = WriteFilter(disk, jdir, cap_bytes=128 * 1024, segment_bytes=16 * 1024)
        item_id = uuid.uuid4()
        raw = assignment_for(ps, vault, item_id, [(0, disk, jdir)])
        raw["process_server_url"] = f"https://127.0.0.1:{proxy.port}"
        agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], auto_resync=True, window=1)
        proxy.armed = 10**6  # the network loses every answer to a batch: the copy stops early
        status = agent.run_once()[str(item_id)]
        assert status["phase"] == "initial" and status["last_error"]
        assert load_item_state(str(tmp_path / "agent"), item_id).cursor != [1, 0]  # in the middle of it
        random_writes(wf, size, 60, random.Random(8), max_len=8192)  # more than the journal holds
        assert journal.overflowed(jdir)
        proxy.armed = 0
        status = agent.run_once()[str(item_id)]
        assert status["phase"] == "resync_required" and "overflowed" in status["resync_reason"]
        status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
        batches = uploaded(ps, vault, item_id, status["acked_seq"])
        done = [b.seq for b in batches if b.flags & batch_format.FLAG_INITIAL_DONE]
        assert len(done) == 1 and not any(b.flags & batch_format.FLAG_RESYNC for b in batches)
        assert_replica_matches(tmp_path, batches, {0: disk})
        agent.close()
    finally:
        proxy.close()


def test_the_agent_runs_from_its_own_folder_with_only_its_own_requirements(tmp_path):
    """``mobility/`` alone (copied elsewhere) imports and starts: nothing of the vault comes
    in, and the only packages outside the standard library are those its requirements name."""
    import shutil

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copytree(os.path.join(repo, "mobility"), tmp_path / "mobility")
    with open(os.path.join(repo, "mobility", "requirements.txt")) as f:
        named = {line.split("==")[0].strip() for line in f if line.strip() and not line.startswith("#")}
    probe = (
        "import sys, mobility.agent, mobility.__main__\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "print(' '.join(sorted(t for t in top if t not in sys.stdlib_module_names and t not in ('mobility', '__main__'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    third_party = set(out.stdout.split())
    assert third_party <= named, f"the agent imports {sorted(third_party - named)} beyond its requirements"
    assert {"blake3", "isal"} <= third_party
    usage = subprocess.run([sys.executable, "-m", "mobility", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "usage" in usage.stdout.lower(), usage.stderr


def test_a_resync_asked_for_without_known_trouble_compares_with_the_replica(tmp_path, start_ps, vault, config_server):
    """An admin who doubts a protected item's replica asks for a resync: the block map is no
    evidence then, so every block is compared with the replica's own digests; nothing
    differs, so no data is sent, and the pass still ends: its last seq is reported (with the
    event and in the status) so the vault can wait for the replica to apply it."""
    ps = start_ps()
    size = 2 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=6)
    jdir = str(tmp_path / "j")
    item_id = uuid.uuid4()
    stub = config_server()
    stub.items = [assignment_for(ps, vault, item_id, [(0, disk, jdir)])]
    WriteFilter(disk, jdir, cap_bytes=MiB, segment_bytes=64 * 1024)
    agent = Agent(state_dir=str(tmp_path / "agent"), config_url=stub.url, passphrase=stub.passphrase,
                  machine=machine_for([(0, disk, jdir)]), block_bytes=BLOCK, batch_bytes=MiB, retry=FAST_RETRY,
                  assignment_interval=0)
    agent.register()
    worker = ReplicaWorker(ps, vault, item_id, {0: size})
    acked = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    stub.items[0]["resync"] = True
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    assert status["phase"] == "delta" and status["pass_done_seq"] == status["acked_seq"] > acked
    assert (status["compared_bytes"], status["sent_bytes"], status["total_bytes"]) == (size, 0, size)
    worker.wait_applied(status["acked_seq"])
    resync = [b for b in worker.since(acked) if b.flags & batch_format.FLAG_RESYNC]
    assert resync and not [r for b in resync for r in b.records]  # compared, nothing sent
    assert worker.answered == 1
    worker.assert_matches({0: disk})
    [event] = wait_for(lambda: stub.events_of("resync_complete"), timeout=10, what="resync_complete")
    assert event["seq"] == status["pass_done_seq"]
    worker.close()
    agent.close()


def _bookmark_batch(batches, bookmark_id: str) -> int:
    for i, b in enumerate(batches):
        for r in b.records:
            if r.kind == batch_format.KIND_BOOKMARK and json.loads(bytes(r.data))["id"] == bookmark_id:
                return i
    raise AssertionError(f"no batch carries bookmark {bookmark_id}")


def test_the_guest_freeze_hook_bookmarks_the_quiesced_moment_while_the_vm_writes_on(tmp_path, start_ps, vault,
                                                                                    config_server):
    """The freeze hook runs while the VM's writes are held; the VM writes on once thawed and
    the agent ships those writes too, yet the bookmark's point is exactly the quiesced disk.
    A bookmark asked for with positions the stream has already gone past is dropped, never
    placed late (its point would not be app-consistent)."""
    from mobility.agent import guest_freeze

    ps = start_ps()
    size = 2 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=8)
    jdir = str(tmp_path / "j")
    item_id = uuid.uuid4()
    stub = config_server()
    stub.items = [assignment_for(ps, vault, item_id, [(0, disk, jdir)])]
    wf = WriteFilter(disk, jdir, cap_bytes=8 * MiB, segment_bytes=256 * 1024)
    agent = Agent(state_dir=str(tmp_path / "agent"), config_url=stub.url, passphrase=stub.passphrase,
                  machine=machine_for([(0, disk, jdir)]), block_bytes=BLOCK, batch_bytes=MiB, retry=FAST_RETRY,
                  assignment_interval=0)
    agent.register()
    agent.replicate_until_caught_up(timeout=60)
    rng = random.Random(12)
    random_writes(wf, size, 20, rng)
    stale = {"0": journal.last_seq(jdir)}  # where the journal stands now ...
    random_writes(wf, size, 20, rng)
    agent.replicate_until_caught_up(timeout=60)  # ... and the stream goes past it

    io = threading.Lock()
    stop = threading.Event()

    def vm():  # writes all the time, except while quiesced
        r = random.Random(13)
        while not stop.is_set():
            with io:
                random_writes(wf, size, 1, r)
            time.sleep(0.002)

    writer = threading.Thread(target=vm, daemon=True)
    writer.start()
    try:
        for _ in range(3):
            agent.run_once()
        with io:  # quiesced: the hook runs, the disk is what the point must hold
            [request] = guest_freeze(str(tmp_path / "agent"), bookmark_id="quiesce-1", label="nightly")
            frozen = sha256_file(disk)
        for _ in range(5):
            agent.run_once()
        # The vault's own copy of the same bookmark, and a late one, arrive by the assignment.
        stub.items[0]["bookmarks"] = [{"id": "quiesce-1", "label": "nightly", "positions": {"0": 1}},
                                      {"id": "late", "label": "too late", "positions": stale}]
        for _ in range(3):
            agent.run_once()
    finally:
        stop.set()
        writer.join(timeout=10)
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    batches = uploaded(ps, vault, item_id, status["acked_seq"])
    at = _bookmark_batch(batches, "quiesce-1")
    assert any(r.kind == batch_format.KIND_WRITE for b in batches[at + 1:] for r in b.records), \
        "the VM's writes after the thaw must be shipped after the bookmark"
    image = zero_image(str(tmp_path / "at-bookmark.img"), size)
    replay(batches[: at + 1], {0: image})
    assert sha256_file(image) == frozen
    marks = [json.loads(bytes(r.data))["id"] for b in batches for r in b.records if r.kind == batch_format.KIND_BOOKMARK]
    assert marks.count("quiesce-1") == 1 and "late" not in marks
    assert_replica_matches(tmp_path, batches, {0: disk})
    agent.close()


def _flip_replica(worker: ReplicaWorker, rng: random.Random, disk: int, size: int, blocks: list[int]) -> set:
    flipped = set()
    for k in blocks:
        worker.flip(disk, k * 4096, rng.randbytes(4096))
        flipped.add((disk, k))
    return flipped


def _lose_block_maps(state_dir, item_id) -> None:
    item_dir = os.path.join(str(state_dir), "items", str(item_id))
    for name in os.listdir(item_dir):
        if name.startswith("blockmap-"):
            os.unlink(os.path.join(item_dir, name))


def test_a_resync_sends_exactly_the_4k_blocks_that_differ_from_the_replica(tmp_path, start_ps, vault):
    """Replica blocks flipped behind Lifeboat's back and the agent's block map lost: the
    resync compares with the replica itself, ships exactly the differing 4 KiB blocks
    (adjacent ones as one record), and the replica ends equal to the source."""
    ps = start_ps()
    s0, s1 = 4 * MiB, 2 * MiB + 8192  # the scanned disk ends in a short group
    d0 = make_disk(str(tmp_path / "d0.img"), s0, seed=11)
    d1 = make_disk(str(tmp_path / "d1.img"), s1, seed=12)
    with open(d1, "ab") as f:
        f.write(random.Random(12).randbytes(s1 - os.path.getsize(d1)))
    jdir = str(tmp_path / "j0")
    WriteFilter(d0, jdir)
    item_id = uuid.uuid4()
    items = [item_for(ps, vault, item_id, [(0, d0, jdir), (1, d1, None)])]
    worker = ReplicaWorker(ps, vault, item_id, {0: s0, 1: s1})
    agent = small_agent(tmp_path / "agent", items)
    acked = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    worker.wait_applied(acked)
    worker.assert_matches({0: d0, 1: d1})
    agent.close()

    rng = random.Random(13)
    flipped = _flip_replica(worker, rng, 0, s0, [0, 5, 6, 7, 100, 511, 1023])
    flipped |= _flip_replica(worker, rng, 1, s1, [3, 16, 17, 513])  # 513: the very last 4 KiB block
    _lose_block_maps(tmp_path / "agent", item_id)
    agent = small_agent(tmp_path / "agent", items)
    agent.request_resync(item_id)
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    assert status["phase"] == "delta" and status["pass_done_seq"] == status["acked_seq"]
    assert (status["compared_bytes"], status["sent_bytes"]) == (s0 + s1, 4096 * len(flipped))
    worker.wait_applied(status["acked_seq"])
    resync = worker.since(acked)
    assert all(b.flags & batch_format.FLAG_RESYNC for b in resync)
    assert fine_blocks(resync) == sorted(flipped)
    writes = [r for b in resync for r in b.records if r.kind == batch_format.KIND_WRITE]
    assert len(writes) == 8  # 5-7 and 16-17 went as one record each
    worker.assert_matches({0: d0, 1: d1})

    # the block map is right again: a scan finds nothing to send on the scanned disk
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    worker.wait_applied(status["acked_seq"])
    assert not [r for b in worker.since(resync[-1].seq) for r in b.records if r.kind == batch_format.KIND_WRITE]
    worker.close()
    agent.close()


def test_a_resync_reads_only_differing_groups_and_source_writes_during_the_pass_still_arrive(
        tmp_path, start_ps, vault, monkeypatch):
    """Of a block whose groups differ from the replica's, the resync reads only the
    differing groups. Source writes made after the source was hashed for the pass: one in
    a differing group (the group no longer has the digest it was hashed with: the block is
    read whole and the write goes with the resync), one in an equal group of such a block
    (not read: the block map records the block as hashed, so the next scan sends it). The
    replica ends equal to the source."""
    ps = start_ps()
    size = 4 * MiB
    d0 = make_disk(str(tmp_path / "d0.img"), size, seed=31)  # scanned, no journal
    item_id = uuid.uuid4()
    items = [item_for(ps, vault, item_id, [(0, d0, None)])]
    worker = ReplicaWorker(ps, vault, item_id, {0: size})
    agent = small_agent(tmp_path / "agent", items, block_bytes=256 * 1024)  # 4 groups per block
    acked = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
    worker.wait_applied(acked)
    agent.close()

    rng = random.Random(32)
    flipped = _flip_replica(worker, rng, 0, size, [1, 70])  # block 0 group 0, block 1 group 4
    written = {}

    real_result = checksum_pass.SourceDigests.result

    def result_then_written(self):
        out = real_result(self)
        with open(d0, "r+b") as f:
            for k in (2, 100):  # block 0 group 0 (differs), block 1 group 6 (equal)
                written[k] = rng.randbytes(4096)
                f.seek(k * 4096)
                f.write(written[k])
        return out

    monkeypatch.setattr(checksum_pass.SourceDigests, "result", result_then_written)
    agent = small_agent(tmp_path / "agent", items, block_bytes=256 * 1024)
    agent.request_resync(item_id)
    status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
    assert written and status["phase"] == "delta"
    worker.wait_applied(status["acked_seq"])
    batches = worker.since(acked)
    resync = [b for b in batches if b.flags & batch_format.FLAG_RESYNC]
    after = [b for b in batches if not b.flags & batch_format.FLAG_RESYNC]
    assert fine_blocks(resync) == sorted(flipped | {(0, 2)})  # the whole of block 0 compared again
    # the scan after the pass sends block 1 (the write it holds); block 0's map entry is
    # what the replica holds, so the scan does not send it again
    assert (0, 100) in fine_blocks(after) and all(64 <= k < 128 for _, k in fine_blocks(after))
    worker.assert_matches({0: d0})
    worker.close()
    agent.close()


def test_a_resync_batch_lost_in_flight_is_rebuilt_the_same_after_a_restart(tmp_path, start_ps, vault):
    """The answers to a resync's "ranges" batch are lost and the agent stops; a new agent
    rebuilds the same batch from the saved plan, for the same seq, and the resync ends right."""
    ps = start_ps()
    size = 4 * MiB
    disk = make_disk(str(tmp_path / "d.img"), size, seed=21)
    item_id = uuid.uuid4()
    worker = ReplicaWorker(ps, vault, item_id, {0: size})
    proxy = AnswerDroppingProxy(ps.port, min_request=16 * 1024)
    try:
        raw = assignment_for(ps, vault, item_id, [(0, disk, None)])
        agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], window=1)
        acked = agent.replicate_until_caught_up(timeout=60)[str(item_id)]["acked_seq"]
        worker.wait_applied(acked)
        agent.close()
        flipped = _flip_replica(worker, random.Random(22), 0, size, list(range(40, 48)) + [300, 900])

        raw["process_server_url"] = f"https://127.0.0.1:{proxy.port}"
        agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], window=1)
        agent.request_resync(item_id)
        proxy.armed = 1000  # every answer to a batch of 16 KiB or more is lost
        deadline = time.monotonic() + 60
        while True:
            status = agent.run_once()[str(item_id)]
            plans = load_item_state(str(tmp_path / "agent"), item_id).inflight
            if any(p["kind"] == "ranges" and p["ranges"] for p in plans):
                break
            assert time.monotonic() < deadline, status
        assert status["last_error"]
        agent.close()
        [plan] = plans
        worker.wait_applied(plan["seq"])  # the process server took it: only the answer was lost
        proxy.armed = 0

        agent = small_agent(tmp_path / "agent", [ItemAssignment.from_dict(raw)], window=1)
        runner = agent._runner(agent.assignment[0])
        runner.state = load_item_state(str(tmp_path / "agent"), item_id)
        rebuilt = runner._rebuild(plan)
        assert b"".join(bytes(p) for p in rebuilt.encoded.parts) == worker.plain[plan["seq"]]
        status = agent.replicate_until_caught_up(timeout=60)[str(item_id)]
        assert status["phase"] == "delta" and status["pass_done_seq"] == plan["seq"]
        worker.wait_applied(status["acked_seq"])
        assert fine_blocks(b for b in worker.since(acked) if b.flags & batch_format.FLAG_RESYNC) == sorted(flipped)
        # the agent cannot know which bytes the process server kept for the replayed batch:
        # the blocks it touched became unknown in the map, and the next scan sent them again
        worker.assert_matches({0: disk})
        agent.close()
    finally:
        proxy.close()
        worker.close()


def test_the_item_state_loads_older_and_newer_saved_files(tmp_path, caplog):
    """The crash-safety state is a declared structure saved as the same JSON: a file from an
    older agent (keys missing) loads with the defaults that keep its behaviour, keys this
    agent does not know are dropped (and logged), and a save loads back equal."""
    from mobility.slots import SlotFile
    from mobility.state import ItemState, StateError

    item_id = uuid.uuid4()
    older = {"item_id": str(item_id), "phase": "delta", "next_seq": 8, "acked_seq": 7, "capacity": {"0": 4096},
             "block_bytes": 1024 * 1024, "cursor": [1, 0], "inflight": [], "bookmarks": [], "scan_passes": 2,
             "journal_planned": {"0": 5}, "journal_acked": {"0": 5}, "journal_pos": {"0": None},
             "journal_planned_pos": {"0": None}, "a_key_from_elsewhere": 1}
    path = tmp_path / "items" / str(item_id)
    path.mkdir(parents=True)
    store = SlotFile(str(path / "state.slots"))
    store.write(json.dumps(older).encode())
    store.close()
    with caplog.at_level("INFO", logger="lifeboat.mobility"):
        state = load_item_state(str(tmp_path), item_id)
    assert "a_key_from_elsewhere" in caplog.text
    assert (state.next_seq, state.cursor, state.journal_planned) == (8, [1, 0], {"0": 5})
    # missing keys: the initial copy of a state saved before "initial_done" existed had ended,
    # nothing is due, no resync under way
    assert state.initial_done and state.disks_due == {} and state.resync_mode == "blocks" and state.digest_seq is None
    assert state.bookmark_ids_seen == [] and state.pass_done_seq is None and not state.resync_flag_taken
    saved = json.loads(state.to_json())
    assert "a_key_from_elsewhere" not in saved and ItemState.from_dict(saved) == state
    with pytest.raises(AttributeError):
        state.no_such_field = 1  # a typo cannot add a key the next load would drop
    with pytest.raises(StateError, match="lacks block_bytes"):
        ItemState.from_dict({k: v for k, v in older.items() if k != "block_bytes"})
