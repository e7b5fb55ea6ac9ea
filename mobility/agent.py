"""The mobility agent: registration, change tracking and shipping of protected items.

For each protected item the agent keeps one stream of batches (seq 1, 2, ...) to the item's
process server:

1. Initial replication: before reading anything it notes, per journaled disk, the journal's
   newest seq (the *base*); then it reads every block of every disk and ships them in
   batches flagged FLAG_INITIAL, the last one also FLAG_INITIAL_DONE. Journal records after
   the base follow in the same stream, so every write that raced with the copy is applied
   after the block it changed: the replica ends right whatever the copy read.
2. Delta replication: journaled disks ship their write-filter journal in write order
   (records of several disks merged by time, each disk's own order kept); disks without a
   journal are compared block by block (BLAKE3 digests) with the block map and changed
   blocks are shipped. A bookmark (app-consistent marker) is placed after every write
   journaled before it was requested and is always the last record of its batch.
3. Resynchronization: when the journal overflowed, skipped or restarted, or the process
   server lost acknowledged batches, the agent reports ``resync_required`` to the
   configuration server and stops shipping the item. When told (assignment ``"resync":
   true``, ``Agent.request_resync`` or ``python -m mobility resync``) it takes a new journal
   base, re-arms the journal and compares the source with the replica as it is: once every
   batch before the pass is acknowledged it sends an empty FLAG_RESYNC batch (the pass's
   *digest seq*) and asks the process server for the replica's 64 KiB group digests computed
   after that seq (``mobility.checksums``; while the worker computes them the cycle ends
   "waiting for the replica's checksums" and the next one asks again). Each source block
   read is cut into 4 KiB blocks and 64 KiB groups; for the groups that differ the replica's
   4 KiB digests are fetched (one request per few MiB of source) and only the 4 KiB blocks
   that differ are sent, adjacent ones as one record, in batches planned as ``"ranges"``.
   A process server that does not serve digests (404) gets the older pass: every block
   whose checksum differs from the block map (every block, if the replica may have lost data).

Crash safety. Before a batch is sent its *plan* (which blocks, or which journal records) is
saved durably with the item's state (``slots.SlotFile``); a batch whose answer the agent
never saw is rebuilt from its plan and sent again with the same seq. Journal plans rebuild byte-identical
batches; block plans re-read the disk, and when the process server answers "already
acknowledged" the agent cannot know which content got there, so it marks those blocks
unknown in the block map and a later scan or resync sends them again. Journal segments are
deleted only once acknowledged.

Threads: one thread drives an ``Agent`` (``run_once``/``run_forever``); each item has up to
``window`` sender threads (one pinned HTTPS connection each) and a saver thread, so reading
and hashing the next batch overlaps with sending and with waiting for the disk.
``request_bookmark`` and ``request_resync`` may be called from any thread or process: they
leave a request in the state directory.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

from mobility import filter as journal
from mobility import wire
from mobility.blockmap import UNKNOWN, BlockMap, map_path
from mobility.checksums import (
    FINE_BYTES,
    FINE_DIGEST_BYTES,
    GROUP_BLOCKS,
    GROUP_BYTES,
    block_digest,
    fine_digests,
    group_digests,
)
from mobility.slots import SlotFile
from mobility.transport import (
    BatchAnswer,
    DigestAnswer,
    JsonClient,
    PinMismatch,
    ProcessServerClient,
    RetryPolicy,
    TransportError,
)

log = logging.getLogger("lifeboat.mobility")

AGENT_VERSION = "1.0"
BLOCK_BYTES = 1024 * 1024
BATCH_BYTES = 8 * 1024 * 1024
MAX_DELAY = 1.0
TICK_INTERVAL = 5.0  # an idle item sends an empty batch this often (0: never)
TICK_MARGIN_NS = 1_000_000_000

PHASE_INITIAL = "initial"
PHASE_DELTA = "delta"
PHASE_RESYNC_REQUIRED = "resync_required"
PHASE_RESYNC = "resync"

COMPARE_BYTES = 8 * 1024 * 1024  # source read ahead of one request for the replica's 4 KiB digests
MAX_GROUPS_PER_REQUEST = 4096  # the process server's limit per block-digest request
DIGEST_POLL_SECONDS = 0.2  # at most this long between asks for the replica's checksums


class AgentError(Exception):
    """The agent cannot go on with an operation; the message says what to fix."""


# --- assignment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskAssignment:
    index: int
    key: str
    path: str
    journal_dir: str | None = None


@dataclass(frozen=True)
class ItemAssignment:
    item_id: uuid.UUID
    item_token: str
    process_server_url: str
    process_server_thumbprint: str
    disks: tuple[DiskAssignment, ...]
    # The configuration server asks for a resynchronization (the item is RESYNCING) ...
    resync: bool = field(default=False, compare=False)
    # ... or for app-consistent bookmarks: [{"id", "label", "positions": {disk index: journal seq}}]
    bookmarks: tuple[dict, ...] = field(default=(), compare=False)
    # Names the request (one per time the item entered RESYNCING): two requests in a row are
    # two resyncs even if this agent never saw the flag down in between.
    resync_id: str = field(default="", compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> "ItemAssignment":
        try:
            disks = tuple(
                DiskAssignment(int(d["index"]), str(d.get("key", d["index"])), str(d["path"]),
                               d.get("journal_dir") or None)
                for d in raw["disks"]
            )
            bookmarks = tuple(dict(b) for b in raw.get("bookmarks") or () if isinstance(b, dict) and b.get("id"))
            item = cls(uuid.UUID(str(raw["item_id"])), str(raw["item_token"]), str(raw["process_server_url"]),
                       str(raw["process_server_thumbprint"]), disks, bool(raw.get("resync", False)), bookmarks,
                       str(raw.get("resync_id") or ""))
        except (KeyError, TypeError, ValueError) as e:
            raise AgentError(f"the assignment of item {raw.get('item_id')!r} is malformed: {e!r}") from None
        if len({d.index for d in disks}) != len(disks):
            raise AgentError(f"the assignment of item {item.item_id} repeats a disk index")
        return item

    def to_dict(self) -> dict:
        return {
            "item_id": str(self.item_id),
            "item_token": self.item_token,
            "process_server_url": self.process_server_url,
            "process_server_thumbprint": self.process_server_thumbprint,
            "resync": self.resync,
            "resync_id": self.resync_id,
            "bookmarks": list(self.bookmarks),
            "disks": [{"index": d.index, "key": d.key, "path": d.path, "journal_dir": d.journal_dir}
                      for d in self.disks],
        }


# --- small durable-file helpers -------------------------------------------------------------------


def _write_json(path: str, value: Any, *, mode: int = 0o600) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        data = json.dumps(value, sort_keys=True).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


# --- batches in the making -----------------------------------------------------------------------


@dataclass
class _Built:
    """A batch ready to send: its bytes (as pieces), its plan and what its ack changes."""

    seq: int
    plan: dict
    encoded: wire.EncodedBatch
    block_digests: list[tuple[int, int, bytes]] = field(default_factory=list)  # (disk, block, digest)
    journal_blocks: list[tuple[int, int]] = field(default_factory=list)  # (disk, block) touched
    copy_bytes: int = 0
    sent_data: int = 0  # bytes of disk data the batch carries (a resync's "bytes sent")
    rebuilt: bool = False  # made again from a saved plan (already in the state's inflight list)
    buffer: bytearray | None = None  # pooled read buffer the records point into


_BARRIER = object()  # yielded among batches: wait for every batch in flight to be answered


class _Waiting(Exception):
    """The pass cannot go on before something outside the agent happens (the replica's
    checksums being computed): the cycle ends and the next one tries again."""


class _NeedsResync(Exception):
    def __init__(self, reason: str, *, full: bool) -> None:
        super().__init__(reason)
        self.reason, self.full = reason, full


class _Sender:
    """Up to ``window`` batches of one item in flight, each on its own pinned connection."""

    def __init__(self, item: ItemAssignment, *, window: int, retry: RetryPolicy, timeout: float) -> None:
        self.item = item
        self.retry = retry
        self.timeout = timeout
        self._local = threading.local()
        self._clients: list[ProcessServerClient] = []
        self._pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix=f"send-{str(item.item_id)[:8]}")
        self._lock = threading.Lock()

    def _client(self) -> ProcessServerClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = ProcessServerClient(self.item.process_server_url,
                                         thumbprint=self.item.process_server_thumbprint, timeout=self.timeout)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def submit(self, built: _Built, *, acked_floor: int, after: Future | None = None) -> Future:
        return self._pool.submit(self._send, built, acked_floor, after)

    def _send(self, built: _Built, acked_floor: int, after: Future | None = None) -> BatchAnswer:
        if after is not None:
            after.result()  # the batch's plan is durable: only now may it leave
        def once() -> BatchAnswer:
            answer = self._client().send_batch(item_id=self.item.item_id, token=self.item.item_token,
                                               seq=built.seq, parts=built.encoded.parts, size=built.encoded.size)
            if answer.outcome == "gap" and answer.acked_seq >= acked_floor:
                # a predecessor of this batch is still on its way (or is being retried)
                raise TransportError(answer.message, transient=True, body={"acked_seq": answer.acked_seq})
            return answer

        return self.retry.run(once)

    def acked_seq(self) -> int:
        return self.retry.run(lambda: self._client().item_state(item_id=self.item.item_id,
                                                                token=self.item.item_token))

    def replica_digests(self, *, disk: int, min_seq: int, groups: str | None = None) -> DigestAnswer:
        return self.retry.run(lambda: self._client().replica_digests(
            item_id=self.item.item_id, token=self.item.item_token, disk=disk, min_seq=min_seq, groups=groups))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()


# --- one protected item -----------------------------------------------------------------------------


class _ItemRunner:
    def __init__(self, agent: "Agent", item: ItemAssignment) -> None:
        self.agent = agent
        self.item = item
        self.dir = os.path.join(agent.state_dir, "items", str(item.item_id))
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.store = SlotFile(os.path.join(self.dir, "state.slots"))
        self.state: dict = self._stored_state()
        self.disks = sorted(item.disks, key=lambda d: d.index)
        self.maps: dict[int, BlockMap] = {}
        self.fds: dict[int, int] = {}
        self.sender = _Sender(item, window=agent.window, retry=agent.retry, timeout=agent.io_timeout)
        self.last_error = ""
        self._last_batch_at = time.monotonic()
        self.sent_batches = 0
        self.sent_bytes = 0
        self._next_reset_check = 0.0
        self._buffers: list[bytearray] = []  # batch-sized read buffers, reused (no fresh pages per batch)
        self._drop_due = False
        self._gathered_full = False
        self.dropped_bookmarks = 0  # taken too late to be placed where they were taken
        self.waiting = ""  # what the last cycle waited for, if anything
        self._replica_groups: dict = {}  # the replica's group digests for the current pass
        self._digests_retry_at = 0.0
        # Saves wait for the disk; the main thread meanwhile reads and hashes the next batch.
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="save")

    # -- state

    def save(self) -> None:
        self.save_async().result()

    def save_async(self) -> Future:
        """Make the in-memory state, as it is now, durable, in the saver thread (saves are
        written in order). The block maps go first: a saved ack must never point at map
        entries that were not saved with it. Journal segments whose records are acked go
        once the ack is saved."""
        map_writes = [m.take_changes() for m in self.maps.values()]
        payload = json.dumps(self.state, separators=(",", ":")).encode()
        drops = []
        if self._drop_due:
            self._drop_due = False
            drops = [(d.journal_dir, self.state["journal_acked"][str(d.index)]) for d in self.journaled]

        def write() -> None:
            for w in map_writes:
                w()
            self.store.write(payload)
            for journal_dir, acked in drops:
                journal.drop_segments_through(journal_dir, acked_seq=acked)

        return self._saver.submit(write)

    def _stored_state(self) -> dict:
        raw = self.store.read()
        return json.loads(raw) if raw else {}

    def _capacity(self, disk: DiskAssignment) -> int:
        fd = self._fd(disk)
        return os.lseek(fd, 0, os.SEEK_END)

    def _fd(self, disk: DiskAssignment) -> int:
        fd = self.fds.get(disk.index)
        if fd is None:
            try:
                fd = os.open(disk.path, os.O_RDONLY)
            except OSError as e:
                raise AgentError(f"cannot open disk {disk.key} ({disk.path}): {e.strerror}") from None
            self.fds[disk.index] = fd
        return fd

    @property
    def bb(self) -> int:
        """The item's block size (chosen when its replication started)."""
        return self.state["block_bytes"]

    def _map(self, disk: DiskAssignment) -> BlockMap:
        m = self.maps.get(disk.index)
        if m is None:
            cap = self.state["capacity"][str(disk.index)]
            blocks = -(-cap // self.bb)
            m = BlockMap(map_path(self.dir, disk.index), blocks=blocks)
            self.maps[disk.index] = m
        return m

    def close(self) -> None:
        self.sender.close()
        self._saver.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.store.close()

    @property
    def journaled(self) -> list[DiskAssignment]:
        return [d for d in self.disks if d.journal_dir]

    @property
    def scanned(self) -> list[DiskAssignment]:
        return [d for d in self.disks if not d.journal_dir]

    def _start(self) -> None:
        """First sight of the item: continue the process server's seq, note the journal
        bases and start the initial replication."""
        acked = self.sender.acked_seq()
        capacity = {}
        for d in self.disks:
            cap = self._capacity(d)
            if cap % wire.SECTOR:
                raise AgentError(f"disk {d.key} is {cap} bytes, not a whole number of {wire.SECTOR}-byte sectors")
            capacity[str(d.index)] = cap
        self.state = {
            "item_id": str(self.item.item_id),
            "phase": PHASE_INITIAL,
            "next_seq": acked + 1,
            "acked_seq": acked,
            "capacity": capacity,
            "block_bytes": self.agent.block_bytes,  # fixed for the item: the block maps use it
            "journal_planned": {},
            "journal_acked": {},
            "journal_pos": {},
            "journal_planned_pos": {},
            "cursor": [0, 0],
            "pass_kind": "initial",
            "pass_sent": 0,
            "pass_full": True,
            "pass_total": sum(capacity.values()),
            "pass_acked": 0,
            "pass_done_seq": None,
            "inflight": [],
            "bookmarks": [],
            "scan_passes": 0,
            "last_scan_sent": 0,
            "resync_reason": "",
            "resync_full": False,
            "resync_reported": False,
            "initial_done": False,
            "created_at": time.time(),
        }
        self._set_journal_base()
        self.save()
        for d in self.journaled:  # writes before the base are in the copy
            journal.drop_segments_through(d.journal_dir, acked_seq=self.state["journal_acked"][str(d.index)])
        log.info("item %s: initial replication of %d bytes starts at seq %d",
                 self.item.item_id, self.state["pass_total"], acked + 1)

    def _set_journal_base(self) -> None:
        for d in self.journaled:
            base, pos = journal.end_position(d.journal_dir)
            key = str(d.index)
            self.state["journal_planned"][key] = self.state["journal_acked"][key] = base
            self.state["journal_pos"][key] = self.state["journal_planned_pos"][key] = list(pos) if pos else None

    # -- the cycle

    def cycle(self, *, flush: bool, scan: bool = False) -> None:
        if not self.state:
            self._start()
        self.waiting = ""
        try:
            self._take_assigned_bookmarks()
            if self.item.resync_id:
                told = self.item.resync and self.state.get("resync_taken_id") != self.item.resync_id
            else:
                told = self.item.resync and not self.state.get("resync_flag_taken")
            if not self.item.resync and self.state.get("resync_flag_taken"):
                self.state["resync_flag_taken"] = False  # the configuration server saw it through
                self.save()
            if os.path.exists(self._resync_request_path()) or (told and self.state["phase"] != PHASE_RESYNC_REQUIRED):
                self.start_resync()
            self._check_disks()
            if self.state["phase"] == PHASE_RESYNC_REQUIRED:
                self._report_resync()
                if not (told or self.agent.auto_resync):
                    return
                self._begin_resync()
            self._report_pass_done()
            self._ship(self._batches(flush=flush, scan=scan))
            self._report_pass_done()
        except _NeedsResync as e:
            self._reload()
            self._require_resync(e.reason, full=e.full)
        except _Waiting as e:
            self._reload()  # everything sent so far is saved; the pass goes on from its cursor
            self.waiting = str(e)
        except BaseException:
            # What is on disk is consistent (plans are saved before they are sent); whatever
            # this pass changed in memory since is dropped and redone by the next pass.
            self._reload()
            raise

    def _take_assigned_bookmarks(self) -> None:
        seen = self.state.setdefault("bookmark_ids_seen", [])
        for b in self.item.bookmarks:
            if str(b["id"]) in seen:
                continue
            positions = b.get("positions")
            self.add_bookmark(str(b["id"]), str(b.get("label", "")),
                              positions={str(k): int(v) for k, v in positions.items()} if positions else None)

    def _report_pass_done(self) -> None:
        """Tell the configuration server once every batch of a resynchronization is in."""
        st = self.state
        done = st.get("pass_done_seq")
        if st.get("pass_kind") == "resync" and done and st["acked_seq"] >= done and not st.get("pass_reported"):
            if self.agent.report_event(self.item.item_id, "resync_complete",
                                       f"resynchronization sent through seq {done}", seq=done):
                st["pass_reported"] = True
                self.save()

    def _reload(self) -> None:
        self._saver.submit(lambda: None).result()  # saves still queued land first
        self.state = self._stored_state()
        self.maps.clear()

    def _ship(self, batches: Iterator[_Built]) -> None:
        """Send batches with up to ``window`` in flight; acks are taken in seq order."""
        window: list[tuple[_Built, Future]] = []
        try:
            for built in batches:
                if built is _BARRIER:
                    while window:
                        self._complete(*window.pop(0))
                    self.save()
                    continue
                while len(window) >= self.agent.window:
                    self._complete(*window.pop(0))  # (in memory: saved with the next plan)
                if not built.rebuilt:
                    self.state["inflight"].append(built.plan)
                    self.state["next_seq"] = built.seq + 1
                # One save per batch: its plan (and the cursor or journal position it
                # advanced) is durable before any byte of it leaves (the sender waits for
                # the save), together with the acks taken since the last save.
                saved = self.save_async()
                window.append((built, self.sender.submit(built, acked_floor=self.state["acked_seq"], after=saved)))
            while window:
                self._complete(*window.pop(0))
            self.save()
        except BaseException:
            for built, fut in window:  # answers still coming are not used: the plans are resent
                try:
                    fut.result()
                except Exception:
                    pass
                self._give_buffer(built.buffer)
            raise

    def _complete(self, built: _Built, fut: Future) -> None:
        try:
            answer: BatchAnswer = fut.result()  # a TransportError ends the pass; the plans stay saved
        finally:
            self._give_buffer(built.buffer)
            built.buffer = None
        st = self.state
        if answer.outcome == "gap":
            if answer.acked_seq < st["acked_seq"]:
                raise _NeedsResync(
                    f"the process server has batches only up to seq {answer.acked_seq} but had acknowledged "
                    f"{st['acked_seq']}: acknowledged data was lost before it reached storage", full=True)
            raise TransportError(answer.message, transient=True)
        if answer.acked_seq >= st["next_seq"]:
            raise _NeedsResync(
                f"the process server acknowledged seq {answer.acked_seq}, beyond the {st['next_seq'] - 1} "
                "this agent has sent (the agent's state is older than the replica)", full=True)
        # The process server holds exactly these bytes if it took them now, or if this
        # process made the batch (a seq planned here was never sent with other bytes).
        fresh = answer.outcome == "acked" or not built.rebuilt
        for disk, block, value in built.block_digests:
            self._map_by_index(disk).set(block, value if fresh else UNKNOWN)
        for disk, block in built.journal_blocks:
            self._map_by_index(disk).forget(block)
        plan = built.plan
        if plan["kind"] == "journal":
            for disk, (_first, last, seg, end) in plan["ranges"].items():
                st["journal_acked"][disk] = last
                st["journal_pos"][disk] = [seg, end]
        st["pass_acked"] += built.copy_bytes
        st["pass_sent_bytes"] = st.get("pass_sent_bytes", 0) + built.sent_data
        st["acked_seq"] = built.seq
        st["last_ack_at"] = time.time()
        st["inflight"] = [p for p in st["inflight"] if p["seq"] != built.seq]
        if plan.get("bookmark"):
            st["bookmarks"] = [b for b in st["bookmarks"] if b["id"] != plan["bookmark"]["id"]]
        if plan["kind"] == "journal":
            self._drop_due = True  # once the ack is saved
        self.sent_batches += 1
        self.sent_bytes += built.encoded.size

    def _map_by_index(self, index: int) -> BlockMap:
        return self._map(next(d for d in self.disks if d.index == index))

    # -- what to send next

    def _batches(self, *, flush: bool, scan: bool) -> Iterator[_Built]:
        st = self.state
        yield from self._resend_inflight()
        if st["phase"] in (PHASE_INITIAL, PHASE_RESYNC):
            flags = wire.FLAG_INITIAL if st["phase"] == PHASE_INITIAL else wire.FLAG_RESYNC
            if st["phase"] == PHASE_RESYNC and st.get("resync_mode") == "replica":
                yield from self._replica_pass(self.disks, flags=flags)
            else:
                yield from self._copy_pass(self.disks, flags=flags, whole_pass=True)
            yield from self._catch_up(flags)
            log.info("item %s: %s pass planned through seq %d", self.item.item_id, st["phase"],
                     st["next_seq"] - 1)
            st.update(phase=PHASE_DELTA, resync_reason="", resync_full=False, last_scan_at=time.time(),
                      pass_done_seq=st["next_seq"] - 1, pass_reported=False, initial_done=True)
            self.save()
        if self.scanned and (scan or self._scan_due()):
            yield _BARRIER  # the scan compares with the block map, which acks update
            if st["cursor"][0] >= len(self.scanned) or st["pass_kind"] != "scan":
                st.update(cursor=[0, 0], pass_full=False, pass_kind="scan", pass_sent=0)
            yield from self._copy_pass(self.scanned, flags=0)
            st["scan_passes"] += 1
            st["last_scan_at"] = time.time()
            st["last_scan_sent"] = st["pass_sent"]
            self.save()
        if self.journaled:
            yield from self._journal_batches(flush=flush)
        yield from self._ready_bookmarks()

    def _resend_inflight(self) -> Iterator[_Built]:
        """Batches planned but never answered, rebuilt for the same seq, in order."""
        for plan in list(self.state["inflight"]):
            built = self._rebuild(plan)
            built.rebuilt = True
            yield built

    def _scan_due(self) -> bool:
        if any(b.get("scan_pass") is not None and b["scan_pass"] > self.state["scan_passes"]
               for b in self.state["bookmarks"]):
            return True
        return time.time() - self.state.get("last_scan_at", 0) >= self.agent.scan_interval

    def _copy_pass(self, disks: list[DiskAssignment], *, flags: int, whole_pass: bool = False) -> Iterator[_Built]:
        """Read the disks block by block from the saved cursor; ship the blocks that differ
        from the block map (all of them in a full pass).

        Blocks are read over a span of time while writes go on, so after an initial copy or
        a resync the replica is consistent only once the journal records up to where the
        journals stood when the reading ended are applied too: those are the pass's
        *catch-up* (``_catch_up``), and FLAG_INITIAL_DONE goes on the last batch of it."""
        st = self.state
        bb = self.bb
        limit = self.agent.batch_bytes
        full = st["pass_full"]
        if st["cursor"][0] >= len(disks):
            return  # the pass was planned to its end before a restart
        blocks: list[list[int]] = []
        records: list[wire.Record] = []
        digests: list[tuple[int, int, bytes]] = []
        buf = self._take_buffer()
        used = 0
        disk_pos, block = st["cursor"]
        t_ns = time.time_ns()
        while disk_pos < len(disks):
            disk = disks[disk_pos]
            cap = st["capacity"][str(disk.index)]
            nblocks = -(-cap // bb)
            bmap = self._map(disk)
            fd = self._fd(disk)
            while block < nblocks:
                length = min(bb, cap - block * bb)
                if used + length > limit:
                    st["cursor"] = [disk_pos, block]
                    yield self._copy_batch(flags, blocks, records, digests, t_ns, buf)
                    blocks, records, digests = [], [], []
                    buf = self._take_buffer()
                    used = 0
                    t_ns = time.time_ns()
                view = memoryview(buf)[used : used + length]
                _pread_exact(fd, view, block * bb)
                value = block_digest(view)
                if full or not bmap.matches(block, value):
                    blocks.append([disk.index, block])
                    records.append(wire.Record(wire.KIND_WRITE, disk.index, block * bb, view))
                    digests.append((disk.index, block, value))
                    used += length
                    st["pass_sent"] = st.get("pass_sent", 0) + 1
                else:
                    st["pass_acked"] += length
                block += 1
            disk_pos, block = disk_pos + 1, 0
        st["cursor"] = [len(disks), 0]
        catch_up = False
        if whole_pass:
            catch_up = self._end_of_pass()
        last_flags = flags | (wire.FLAG_INITIAL_DONE if flags & wire.FLAG_INITIAL and not catch_up else 0)
        if records or last_flags != flags:
            yield self._copy_batch(last_flags, blocks, records, digests, t_ns, buf)
        else:
            self._give_buffer(buf)

    def _end_of_pass(self) -> bool:
        """Note where the journals stand as the reading of a whole pass ends: the pass's
        catch-up ships the records up to there. True if there is a catch-up."""
        st = self.state
        until = {str(d.index): journal.last_seq(d.journal_dir) for d in self.journaled}
        catch_up = any(until[k] > st["journal_planned"][k] for k in until)
        st["catch_up_until"] = until if catch_up else None
        st["consistent_from"] = until
        return catch_up

    def _replica_pass(self, disks: list[DiskAssignment], *, flags: int) -> Iterator[_Built]:
        """A resync pass that compares the source with the replica's own digests and sends
        only the 4 KiB blocks that differ (module docstring, 3.)."""
        st = self.state
        if st["cursor"][0] >= len(disks):
            return  # the pass was planned to its end before a restart
        if self.bb % GROUP_BYTES:
            st["resync_mode"] = "blocks"  # blocks not made of whole groups: compare with the block map
            yield from self._copy_pass(disks, flags=flags, whole_pass=True)
            return
        if not st.get("digest_seq"):
            yield _BARRIER  # every batch before the pass is in: the replica's digests will cover them
            seq = st["next_seq"]
            st["digest_seq"] = seq
            t_ns = time.time_ns()
            plan = {"seq": seq, "kind": "ranges", "flags": flags, "ranges": [], "time_ns": t_ns, "compared": 0}
            yield _Built(seq, plan, wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=t_ns, records=[],
                                                flags=flags))
        yield _BARRIER
        replica = self._replica_group_digests(disks)
        if replica is None:
            log.info("item %s: the process server serves no replica digests: the resync compares with the "
                     "block map", self.item.item_id)
            st["resync_mode"] = "blocks"
            yield from self._copy_pass(disks, flags=flags, whole_pass=True)
            return
        bb = self.bb
        budget = self.agent.batch_bytes - wire.HEADER.size
        client_seq = st["digest_seq"]
        read_buf = bytearray(max(COMPARE_BYTES, bb))
        batch: dict[str, Any] = {"ranges": [], "records": [], "digests": [], "forget": [], "used": 0,
                                 "compared": 0, "sent": 0, "t_ns": time.time_ns()}

        def take_batch(last_flags: int) -> _Built:
            seq = st["next_seq"]
            plan = {"seq": seq, "kind": "ranges", "flags": last_flags, "ranges": batch["ranges"],
                    "time_ns": batch["t_ns"], "compared": batch["compared"]}
            encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=batch["t_ns"],
                                  records=batch["records"], flags=last_flags)
            built = _Built(seq, plan, encoded, block_digests=batch["digests"], journal_blocks=batch["forget"],
                           copy_bytes=batch["compared"], sent_data=batch["sent"])
            batch.update(ranges=[], records=[], digests=[], forget=[], used=0, compared=0, sent=0,
                         t_ns=time.time_ns())
            return built

        disk_pos, block = st["cursor"]
        while disk_pos < len(disks):
            disk = disks[disk_pos]
            cap = st["capacity"][str(disk.index)]
            nblocks = -(-cap // bb)
            fd = self._fd(disk)
            bmap = self._map(disk)
            groups_r, replica_size = replica[disk.index]
            same_size = replica_size == cap
            fine_total = -(-cap // FINE_BYTES)
            pending: list[tuple[int, int, int, bytes, list[int]]] = []  # block, offset in read_buf, length, fine, groups
            used_read = 0

            def settle() -> Iterator[_Built]:
                """Fetch the replica's 4 KiB digests of the pending blocks' differing groups,
                then plan the differing 4 KiB blocks."""
                theirs: dict[int, bytes] = {}
                wanted = sorted({g for p in pending for g in p[4]}) if same_size else []
                for i in range(0, len(wanted), MAX_GROUPS_PER_REQUEST):
                    chunk = wanted[i : i + MAX_GROUPS_PER_REQUEST]
                    answer = self.sender.replica_digests(disk=disk.index, min_seq=client_seq,
                                                         groups=_format_groups(chunk))
                    if answer.state != "ready":
                        raise _Waiting("waiting for the replica's checksums")
                    at = 0
                    for g in chunk:
                        n = min(GROUP_BLOCKS, fine_total - g * GROUP_BLOCKS) * FINE_DIGEST_BYTES
                        theirs[g] = answer.data[at : at + n]
                        at += n
                    if at != len(answer.data):
                        raise TransportError(f"the process server sent {len(answer.data)} bytes of block digests "
                                             f"for groups that hold {at}", transient=True)
                for blk, off, length, fine, diff in pending:
                    runs: list[list[int]] = []  # [start, end) within the block
                    first_fine = blk * bb // FINE_BYTES
                    for g in diff:
                        other = theirs.get(g)
                        for j in range(g * GROUP_BLOCKS, min((g + 1) * GROUP_BLOCKS, fine_total)):
                            local = j - first_fine
                            if local < 0 or local * FINE_BYTES >= length:
                                continue
                            mine = fine[local * FINE_DIGEST_BYTES : (local + 1) * FINE_DIGEST_BYTES]
                            k = (j - g * GROUP_BLOCKS) * FINE_DIGEST_BYTES
                            if other is not None and other[k : k + FINE_DIGEST_BYTES] == mine:
                                continue
                            start, end = local * FINE_BYTES, min(length, (local + 1) * FINE_BYTES)
                            if runs and runs[-1][1] == start:
                                runs[-1][1] = end
                            else:
                                runs.append([start, end])
                    view = memoryview(read_buf)[off : off + length]
                    if not runs:  # every 4 KiB block the same after all
                        st["pass_acked"] += length
                        self._note_block(disk, bmap, blk, view, batch=None)
                        continue
                    sent = sum(e - b for b, e in runs)
                    if batch["records"] and batch["used"] + sent + len(runs) * wire.RECORD.size > budget:
                        st["cursor"] = [disk_pos, blk]
                        yield take_batch(flags)
                    for b, e in runs:
                        batch["records"].append(wire.Record(wire.KIND_WRITE, disk.index, blk * bb + b,
                                                            bytes(view[b:e])))
                        batch["ranges"].append([disk.index, blk * bb + b, e - b])
                    batch["used"] += sent + len(runs) * wire.RECORD.size
                    batch["compared"] += length
                    batch["sent"] += sent
                    st["pass_sent"] = st.get("pass_sent", 0) + 1
                    self._note_block(disk, bmap, blk, view, batch=batch)
                pending.clear()

            while block < nblocks:
                length = min(bb, cap - block * bb)
                if used_read + length > len(read_buf):
                    yield from settle()
                    used_read = 0
                view = memoryview(read_buf)[used_read : used_read + length]
                _pread_exact(fd, view, block * bb)
                fine = fine_digests(view)
                mine = group_digests(fine)
                g0 = block * bb // GROUP_BYTES
                diff = [g0 + i for i in range(len(mine) // FINE_DIGEST_BYTES)
                        if not same_size or groups_r[(g0 + i) * FINE_DIGEST_BYTES : (g0 + i + 1) * FINE_DIGEST_BYTES]
                        != mine[i * FINE_DIGEST_BYTES : (i + 1) * FINE_DIGEST_BYTES]]
                st["pass_compared"] = st.get("pass_compared", 0) + length
                if diff:
                    pending.append((block, used_read, length, fine, diff))
                    used_read += length
                else:
                    st["pass_acked"] += length
                    self._note_block(disk, bmap, block, view, batch=None)
                block += 1
            yield from settle()
            disk_pos, block = disk_pos + 1, 0
        st["cursor"] = [len(disks), 0]
        self._end_of_pass()
        if batch["records"]:
            yield take_batch(flags)

    def _note_block(self, disk: DiskAssignment, bmap: BlockMap, block: int, view: memoryview, *,
                    batch: dict | None) -> None:
        """Keep the block map true to a block the resync found equal (``batch`` None) or is
        sending (set once its batch is acknowledged). Only scanned disks compare with the
        map; a journaled disk's entry is forgotten (hashing it would only cost time)."""
        if disk.journal_dir:
            if batch is None:
                bmap.forget(block)
            else:
                batch["forget"].append((disk.index, block))
            return
        value = block_digest(view)
        if batch is None:
            bmap.set(block, value)
        else:
            batch["digests"].append((disk.index, block, value))

    def _replica_group_digests(self, disks: list[DiskAssignment]) -> dict[int, tuple[bytes, int]] | None:
        """The replica's group digests and size of every disk, computed after the pass's
        digest seq: None if the process server serves none; ``_Waiting`` while they are
        being computed (the answers already had are kept for the next cycle)."""
        seq = self.state["digest_seq"]
        if self._replica_groups.get("seq") != seq:
            self._replica_groups = {"seq": seq}
        have = self._replica_groups
        for d in disks:
            if d.index in have:
                continue
            if time.monotonic() < self._digests_retry_at:
                raise _Waiting("waiting for the replica's checksums")
            answer = self.sender.replica_digests(disk=d.index, min_seq=seq)
            if answer.state == "absent":
                return None
            if answer.state == "pending":
                # Retry-After is in whole seconds; a digest object often comes sooner
                self._digests_retry_at = time.monotonic() + min(max(answer.retry_after, 0.1), DIGEST_POLL_SECONDS)
                raise _Waiting("waiting for the replica's checksums")
            groups = -(-answer.disk_size // GROUP_BYTES) if answer.disk_size >= 0 else -1
            if groups < 0 or len(answer.data) != groups * FINE_DIGEST_BYTES:
                raise TransportError(f"the process server sent {len(answer.data)} bytes of group digests for a "
                                     f"disk of {answer.disk_size} bytes", transient=True)
            have[d.index] = (answer.data, answer.disk_size)
        return {d.index: have[d.index] for d in disks}

    def _take_buffer(self) -> bytearray:
        return self._buffers.pop() if self._buffers else bytearray(max(self.agent.batch_bytes, self.bb))

    def _give_buffer(self, buf: bytearray | None) -> None:
        if buf is not None and len(self._buffers) < self.agent.window + 1:
            self._buffers.append(buf)

    def _copy_batch(self, flags: int, blocks: list[list[int]], records: list[wire.Record],
                    digests: list[tuple[int, int, bytes]], t_ns: int, buf: bytearray) -> _Built:
        seq = self.state["next_seq"]
        plan = {"seq": seq, "kind": "copy", "flags": flags, "blocks": blocks, "time_ns": t_ns}
        encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=t_ns, records=records, flags=flags)
        return _Built(seq, plan, encoded, block_digests=digests, copy_bytes=sum(len(r.data) for r in records),
                      buffer=buf)

    def _catch_up(self, flags: int) -> Iterator[_Built]:
        """The journal records written while a pass read the disks, flagged like the pass."""
        st = self.state
        until = st.get("catch_up_until")
        while until:
            self._check_journals()
            limits = {d.index: until[str(d.index)] for d in self.journaled}
            picked = self._gather(limits)
            done = all(st["journal_planned"][k] >= v for k, v in until.items())
            if not picked and not done:
                raise _NeedsResync("journal records written during the copy are missing", full=False)
            last = flags | (wire.FLAG_INITIAL_DONE if done and flags & wire.FLAG_INITIAL else 0)
            if done:
                st["catch_up_until"] = until = None
            yield self._journal_batch(picked, None, flags=last)

    def _tick_due(self) -> bool:
        """An idle item still proves its freshness: when every disk is journaled, nothing is
        in flight and nothing was sent for ``tick_interval``, an empty batch says "the
        source is fully shipped up to here", so recovery points (and RPO) keep up with time."""
        st = self.state
        return (self.agent.tick_interval > 0 and st["phase"] == PHASE_DELTA and not self.scanned
                and not st["inflight"] and not st["bookmarks"]
                and time.monotonic() - self._last_batch_at >= self.agent.tick_interval)

    def _journal_batches(self, *, flush: bool) -> Iterator[_Built]:
        st = self.state
        # Writes journaled before this moment are behind the horizon read just below; the
        # margin covers a writer caught between taking a record's time and appending it.
        drained_ns = time.time_ns() - TICK_MARGIN_NS
        first_round = True
        # one pass ships what was journaled when it began: a busy writer cannot keep it going
        horizon = {}
        for d in self.journaled:
            key = str(d.index)
            pos = st["journal_planned_pos"].get(key)
            horizon[d.index] = journal.end_position(
                d.journal_dir, start=(st["journal_planned"][key], tuple(pos) if pos else None))[0]
        while True:
            self._check_journals()
            sent_ids = {p["bookmark"]["id"] for p in st["inflight"] if p.get("bookmark")}
            bookmark = next((b for b in st["bookmarks"] if b.get("positions") and b["id"] not in sent_ids), None)
            limits = {d.index: min(horizon[d.index], bookmark["positions"].get(str(d.index), 0)) if bookmark
                      else horizon[d.index] for d in self.journaled}
            before = (dict(st["journal_planned"]), dict(st["journal_planned_pos"]))
            picked = self._gather(limits)
            attach = None
            if bookmark and all(st["journal_planned"][k] >= bookmark["positions"].get(k, 0)
                                for k in st["journal_planned"]) \
                    and st["scan_passes"] >= (bookmark.get("scan_pass") or 0):
                attach = bookmark
            if attach is not None and not self._consistent(attach):
                log.warning("item %s: bookmark %s dropped: it was taken before the last copy pass ended, so "
                            "the replica cannot be app-consistent there", self.item.item_id, attach["id"])
                st["bookmarks"] = [b for b in st["bookmarks"] if b["id"] != attach["id"]]
                st["journal_planned"], st["journal_planned_pos"] = before
                self.save()
                continue
            if not picked and attach is None:
                if first_round and self._tick_due():
                    self._last_batch_at = time.monotonic()
                    yield self._journal_batch([], None, tick_ns=drained_ns)
                return
            first_round = False
            oldest = min((r.time_ns for _d, r in picked), default=time.time_ns())
            if (attach is None and not flush and not self._gathered_full
                    and time.time_ns() - oldest < self.agent.max_delay * 1e9):
                st["journal_planned"], st["journal_planned_pos"] = before
                return
            self._last_batch_at = time.monotonic()
            yield self._journal_batch(picked, attach)

    def _gather(self, limits: dict[int, int | None]) -> list[tuple[DiskAssignment, journal.JournalRecord]]:
        """Journal records after the planned position, merged in write order, up to a batch."""
        st = self.state
        budget = self.agent.batch_bytes - wire.HEADER.size - wire.RECORD.size - wire.MAX_BOOKMARK_BYTES
        self._gathered_full = False
        streams = []
        for d in self.journaled:
            key = str(d.index)
            after = st["journal_planned"][key]
            limit = limits[d.index]
            if limit is not None and after >= limit:
                continue
            pos = st["journal_planned_pos"].get(key)
            streams.append(self._journal_stream(d, after, limit, tuple(pos) if pos else None))
        picked = []
        used = 0
        for disk, rec in heapq.merge(*streams, key=lambda x: x[1].time_ns):
            cost = wire.RECORD.size + len(rec.data) + wire.SECTOR * 2
            if cost > wire.MAX_BATCH_BYTES // 2:
                raise _NeedsResync(f"a single write of {len(rec.data)} bytes to disk {disk.key} is too large "
                                   "for a batch", full=False)
            if picked and used + cost > budget:
                self._gathered_full = True
                break
            picked.append((disk, rec))
            used += cost
            st["journal_planned"][str(disk.index)] = rec.seq
            st["journal_planned_pos"][str(disk.index)] = [rec.segment, rec.end]
        return picked

    def _journal_stream(self, disk: DiskAssignment, after: int, limit: int | None,
                        pos: tuple[int, int] | None) -> Iterator[tuple[DiskAssignment, journal.JournalRecord]]:
        expected = after + 1
        for rec in journal.read_journal(disk.journal_dir, after_seq=after, position=pos):
            if limit is not None and rec.seq > limit:
                return
            if rec.seq != expected:
                raise _NeedsResync(f"the journal of disk {disk.key} jumps from seq {expected - 1} to {rec.seq}: "
                                   "writes between them were not journaled", full=False)
            expected += 1
            yield disk, rec

    def _consistent(self, bookmark: dict) -> bool:
        since = self.state.get("consistent_from") or {}
        return all(bookmark["positions"].get(k, 0) >= v for k, v in since.items()) if bookmark.get("positions") \
            else True

    def _journal_batch(self, picked, bookmark: dict | None, *, flags: int = 0, seq: int | None = None,
                       tick_ns: int | None = None) -> _Built:
        st = self.state
        seq = st["next_seq"] if seq is None else seq
        records: list[wire.Record] = []
        touched: set[tuple[int, int]] = set()
        ranges: dict[str, list[int]] = {}
        t_ns = 0
        bb = self.bb
        for disk, rec in picked:
            offset, data = self._aligned(disk, rec)
            records.append(wire.Record(wire.KIND_WRITE, disk.index, offset, data))
            for block in range(offset // bb, (offset + len(data) - 1) // bb + 1):
                touched.add((disk.index, block))
            r = ranges.setdefault(str(disk.index), [rec.seq, rec.seq, rec.segment, rec.end])
            r[1], r[2], r[3] = rec.seq, rec.segment, rec.end
            t_ns = max(t_ns, rec.time_ns)
        plan: dict[str, Any] = {"seq": seq, "kind": "journal", "ranges": ranges, "flags": flags}
        if tick_ns is not None:
            plan["tick_ns"] = tick_ns
            t_ns = max(t_ns, tick_ns)
        if bookmark is not None:
            records.append(wire.Record(wire.KIND_BOOKMARK, 0, 0, _bookmark_label(bookmark)))
            plan["bookmark"] = bookmark
            t_ns = max(t_ns, bookmark["requested_ns"])
        encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=t_ns or time.time_ns(),
                              records=records, flags=flags)
        return _Built(seq, plan, encoded, journal_blocks=sorted(touched))

    def _aligned(self, disk: DiskAssignment, rec: journal.JournalRecord) -> tuple[int, bytes]:
        """The record as a sector-aligned write (a misaligned write is widened with the
        disk's current bytes around it; the writes after it fix anything newer)."""
        start = rec.offset - rec.offset % wire.SECTOR
        end = -(-(rec.offset + len(rec.data)) // wire.SECTOR) * wire.SECTOR
        if start == rec.offset and end == rec.offset + len(rec.data):
            return rec.offset, rec.data
        buf = bytearray(end - start)
        os.preadv(self._fd(disk), [buf], start)
        buf[rec.offset - start : rec.offset - start + len(rec.data)] = rec.data
        return start, bytes(buf)

    def _ready_bookmarks(self) -> Iterator[_Built]:
        """Bookmarks with nothing left to wait for (no journaled disk, or nothing written since
        the last batch) go out in a batch of their own."""
        st = self.state
        while True:
            pending_ids = {p["bookmark"]["id"] for p in st["inflight"] if p.get("bookmark")}
            ready = [b for b in st["bookmarks"] if b["id"] not in pending_ids]
            if not ready:
                return
            b = ready[0]
            if not self._consistent(b):
                st["bookmarks"] = [x for x in st["bookmarks"] if x["id"] != b["id"]]
                self.save()
                continue
            if any(st["journal_planned"].get(k, 0) < v for k, v in (b.get("positions") or {}).items()):
                return
            if st["scan_passes"] < (b.get("scan_pass") or 0):
                return
            yield self._journal_batch([], b)

    def _rebuild(self, plan: dict) -> _Built:
        """The batch of a saved plan, for the same seq."""
        seq = plan["seq"]
        if plan["kind"] == "ranges":
            # the same ranges, read again; the blocks they touch become unknown in the map
            # (what the source holds now need not be what the plan was made from)
            records, touched = [], set()
            bb = self.bb
            for index, offset, length in plan["ranges"]:
                disk = next(d for d in self.disks if d.index == index)
                buf = bytearray(length)
                _pread_exact(self._fd(disk), memoryview(buf), offset)
                records.append(wire.Record(wire.KIND_WRITE, index, offset, buf))
                touched.update((index, b) for b in range(offset // bb, (offset + length - 1) // bb + 1))
            encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=plan["time_ns"],
                                  records=records, flags=plan["flags"])
            return _Built(seq, plan, encoded, journal_blocks=sorted(touched), copy_bytes=plan.get("compared", 0),
                          sent_data=sum(r[2] for r in plan["ranges"]))
        if plan["kind"] == "copy":
            bb = self.bb
            records, digests = [], []
            for index, block in plan["blocks"]:
                disk = next(d for d in self.disks if d.index == index)
                cap = self.state["capacity"][str(index)]
                buf = bytearray(min(bb, cap - block * bb))
                _pread_exact(self._fd(disk), memoryview(buf), block * bb)
                records.append(wire.Record(wire.KIND_WRITE, index, block * bb, buf))
                digests.append((index, block, block_digest(buf)))
            encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=plan["time_ns"],
                                  records=records, flags=plan["flags"])
            copy_bytes = sum(len(r.data) for r in records)
            return _Built(seq, plan, encoded, block_digests=digests, copy_bytes=copy_bytes)
        picked = []
        for key, (first, last, _seg, _end) in sorted(plan["ranges"].items(), key=lambda kv: int(kv[0])):
            disk = next(d for d in self.disks if d.index == int(key))
            recs = []
            for r in journal.read_journal(disk.journal_dir, after_seq=first - 1):
                if r.seq > last:
                    break
                recs.append(r)
            if not recs or recs[0].seq != first or recs[-1].seq != last or len(recs) != last - first + 1:
                raise _NeedsResync(f"journal records {first}..{last} of disk {disk.key} for unacknowledged "
                                   f"batch {seq} are gone", full=False)
            picked.append([(disk, r) for r in recs])
        merged = list(heapq.merge(*picked, key=lambda x: x[1].time_ns))
        built = self._journal_batch(merged, plan.get("bookmark"), flags=plan.get("flags", 0), seq=seq,
                                    tick_ns=plan.get("tick_ns"))
        built.plan = plan
        return built

    # -- checks and resync

    def _check_disks(self) -> None:
        if self.state["phase"] == PHASE_RESYNC_REQUIRED:
            return
        for d in self.disks:
            cap = self._capacity(d)
            if cap != self.state["capacity"][str(d.index)]:
                self.state["capacity"][str(d.index)] = cap
                self.maps.pop(d.index, None)
                self._require_resync(f"disk {d.key} changed size to {cap} bytes", full=True)
                return

    def _check_journals(self) -> None:
        now = time.monotonic()
        for d in self.journaled:
            if journal.overflowed(d.journal_dir):
                raise _NeedsResync(f"the write journal of disk {d.key} overflowed: writes since are not "
                                   "journaled", full=False)
        if now >= self._next_reset_check:
            self._next_reset_check = now + 5.0
            for d in self.journaled:
                newest = journal.last_seq(d.journal_dir)
                planned = self.state["journal_planned"][str(d.index)]
                if newest < planned:
                    raise _NeedsResync(f"the write journal of disk {d.key} restarted (newest seq {newest}, "
                                       f"already shipped up to {planned})", full=False)

    def _require_resync(self, reason: str, *, full: bool) -> None:
        st = self.state
        log.warning("item %s needs resynchronization: %s", self.item.item_id, reason)
        st["phase"] = PHASE_RESYNC_REQUIRED
        st["resync_reason"] = reason
        st["resync_full"] = bool(st.get("resync_full")) or full
        st["resync_reported"] = False
        self.save()
        self._report_resync()

    def _report_resync(self) -> None:
        st = self.state
        if st.get("resync_reported"):
            return
        if self.agent.report_event(self.item.item_id, "resync_required", st["resync_reason"]):
            st["resync_reported"] = True
            self.save()

    def _resync_request_path(self) -> str:
        return os.path.join(self.agent.requests_dir, f"resync-{self.item.item_id}")

    def _begin_resync(self) -> None:
        """Start the checksum-based resynchronization of a RESYNC_REQUIRED item."""
        st = self.state
        full = bool(st.get("resync_full"))
        if self.item.resync:
            st["resync_flag_taken"] = True  # one resync per time the configuration server asks
            st["resync_taken_id"] = self.item.resync_id
        if full:
            # the process server lost batches: go on right after what it still has
            acked = self.sender.acked_seq()
            st.update(acked_seq=acked, next_seq=acked + 1, inflight=[])
        elif st["inflight"]:
            # batches planned before the trouble still own their seqs: deliver them first
            # (as empty batches if their journal records are gone; the resync covers them)
            self._ship(self._resend_or_fill())
        if st["bookmarks"]:
            log.warning("item %s: %d pending bookmark(s) dropped: a resync breaks app consistency",
                        self.item.item_id, len(st["bookmarks"]))
        initial = not st.get("initial_done", True)
        if initial:
            # the initial copy never completed: it starts over (a resync pass could not
            # mark the replica complete)
            full = True
        log.info("item %s: %s starts (%s)", self.item.item_id,
                 "the initial replication" if initial else "full resynchronization" if full
                 else "checksum resynchronization", st.get("resync_reason"))
        self._set_journal_base()
        if full:
            for d in self.disks:
                self._map(d).forget_all()
                self._map(d).flush()
        st.update(phase=PHASE_INITIAL if initial else PHASE_RESYNC, cursor=[0, 0], pass_full=full,
                  pass_kind="initial" if initial else "resync", pass_acked=0, pass_sent=0,
                  resync_mode="replica", digest_seq=None, pass_compared=0, pass_sent_bytes=0,
                  pass_total=sum(st["capacity"].values()), bookmarks=[], pass_done_seq=None, pass_reported=False,
                  catch_up_until=None)
        self.save()
        for d in self.journaled:
            journal.drop_segments_through(d.journal_dir, acked_seq=st["journal_acked"][str(d.index)])
            journal.clear_overflow(d.journal_dir)
        try:
            os.unlink(self._resync_request_path())
        except FileNotFoundError:
            pass

    def _resend_or_fill(self) -> Iterator[_Built]:
        for plan in list(self.state["inflight"]):
            try:
                built = self._rebuild(plan)
            except _NeedsResync:
                encoded = wire.encode(item_id=self.item.item_id, seq=plan["seq"], source_time_ns=time.time_ns(),
                                      records=[])
                built = _Built(plan["seq"], plan, encoded)
            built.rebuilt = True
            yield built

    def start_resync(self) -> None:
        """Resynchronize now (an admin's "Resynchronize", or after resync_required)."""
        if not self.state:
            self._start()
        st = self.state
        if st["phase"] == PHASE_INITIAL:
            log.info("item %s: resynchronization asked for during the initial replication: nothing to do",
                     self.item.item_id)
            st["resync_flag_taken"] = bool(self.item.resync)
            if self.item.resync:
                st["resync_taken_id"] = self.item.resync_id
            self.save()
            try:
                os.unlink(self._resync_request_path())
            except FileNotFoundError:
                pass
            return
        if st["phase"] != PHASE_RESYNC_REQUIRED:
            # Asked for while this agent knows of no trouble: an admin (or the vault) doubts
            # the replica, so the block map is no evidence either: every block is sent again.
            st["phase"] = PHASE_RESYNC_REQUIRED
            st["resync_reason"] = "resynchronization requested"
            st["resync_full"] = True
            st["resync_reported"] = True  # asked for, not discovered: nothing to report
            self.save()
        self._begin_resync()

    # -- bookmarks and status

    def add_bookmark(self, bookmark_id: str, label: str, *, positions: dict[str, int] | None = None) -> None:
        """Queue a bookmark after every write journaled so far (or up to ``positions``: where
        the journals stood when the VM was quiesced). A bookmark whose positions the stream
        has already gone past is dropped: placed later, its point would hold writes made
        after the quiesce and be app-consistent in name only."""
        if not self.state:
            self._start()
        seen = self.state.setdefault("bookmark_ids_seen", [])
        if bookmark_id in seen:
            return  # the same bookmark, asked for twice (the guest's freeze hook and the vault)
        seen.append(bookmark_id)
        del seen[:-200]
        if positions is None:
            positions = {str(d.index): journal.last_seq(d.journal_dir) for d in self.journaled}
        else:
            positions = {str(d.index): positions.get(str(d.index), 0) for d in self.journaled}
            past = {k: (self.state["journal_planned"].get(k, 0), v) for k, v in positions.items()
                    if self.state["journal_planned"].get(k, 0) > v}
            if past:
                log.warning("item %s: bookmark %s (%s) dropped: writes made after it was taken were already "
                            "sent (journal seq shipped / at the bookmark, per disk: %s), so its point would not "
                            "be app-consistent", self.item.item_id, bookmark_id, label, past)
                self.dropped_bookmarks += 1
                self.save()
                return
        self.state["bookmarks"].append({
            "id": bookmark_id,
            "label": label,
            "requested_ns": time.time_ns(),
            "positions": positions,
            "scan_pass": self.state["scan_passes"] + 1 if self.scanned else None,
        })
        self.save()

    def backlog_bytes(self) -> int:
        total = 0
        for d in self.journaled:
            pos = self.state.get("journal_pos", {}).get(str(d.index))
            total += journal.backlog_bytes(d.journal_dir, tuple(pos) if pos else None)
        return total

    def caught_up(self) -> bool:
        st = self.state
        if not st or st["phase"] != PHASE_DELTA or st["inflight"] or st["bookmarks"]:
            return False
        if any(str(b["id"]) not in st.get("bookmark_ids_seen", []) for b in self.item.bookmarks):
            return False
        if self.scanned and st.get("last_scan_sent"):
            return False
        for d in self.journaled:
            newest = journal.last_seq(d.journal_dir)
            if newest > st["journal_acked"][str(d.index)] or journal.overflowed(d.journal_dir):
                return False
        return True

    def status(self) -> dict:
        st = self.state
        total = st.get("pass_total") or 0
        phase = st.get("phase", "new")
        if phase == PHASE_DELTA and st.get("pass_done_seq") and st["acked_seq"] < st["pass_done_seq"]:
            phase = PHASE_INITIAL if st.get("pass_kind") == "initial" else PHASE_RESYNC  # not all acknowledged yet
        progress = None
        if phase in (PHASE_INITIAL, PHASE_RESYNC):
            progress = round(min(0.999, st["pass_acked"] / total), 4) if total else 0.0
        elif st:
            progress = 1.0
        return {
            "item_id": str(self.item.item_id),
            "phase": phase,
            "acked_seq": st.get("acked_seq", 0),
            # the last batch of the newest initial copy or resync pass (None while planning it)
            "pass_done_seq": st.get("pass_done_seq"),
            "resync_id": st.get("resync_taken_id", ""),  # the vault's resync request it serves
            "backlog_bytes": self.backlog_bytes() if st else 0,
            "progress": progress,
            "resync_reason": st.get("resync_reason", ""),
            "last_error": self.last_error,
            # the newest resync pass: bytes of source compared with the replica, bytes sent
            "total_bytes": total,
            "compared_bytes": st.get("pass_compared", 0),
            "sent_bytes": st.get("pass_sent_bytes", 0),
            "waiting": self.waiting,
        }


def _bookmark_label(bookmark: dict) -> bytes:
    label = json.dumps({"id": bookmark["id"], "label": bookmark["label"],
                        "requested_ns": bookmark["requested_ns"]}, sort_keys=True).encode()
    if len(label) > wire.MAX_BOOKMARK_BYTES:
        raise AgentError(f"bookmark label is {len(label)} bytes, over {wire.MAX_BOOKMARK_BYTES}")
    return label


def _format_groups(groups: list[int]) -> str:
    """Ascending groups as the process server's ``a-b,c`` list."""
    parts: list[str] = []
    i = 0
    while i < len(groups):
        j = i
        while j + 1 < len(groups) and groups[j + 1] == groups[j] + 1:
            j += 1
        parts.append(f"{groups[i]}-{groups[j]}" if j > i else str(groups[i]))
        i = j + 1
    return ",".join(parts)


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise AgentError(f"disk ended at {offset + done} while reading {len(view)} bytes at {offset}")
        done += n


# --- the agent ---------------------------------------------------------------------------------------


class Agent:
    """A mobility agent. In-process use::

        agent = Agent(state_dir=..., config_url=..., passphrase=..., machine={...})
        agent.register()                       # once; credentials are kept in state_dir
        agent.replicate_until_caught_up()      # or agent.run_once() / agent.run_forever(stop)

    Without a configuration server pass ``assignment=[ItemAssignment(...)]``.
    """

    def __init__(
        self,
        *,
        state_dir: str,
        config_url: str | None = None,
        passphrase: str | None = None,
        machine: dict | None = None,
        hostname: str | None = None,
        config_ca_file: str | None = None,
        config_thumbprint: str | None = None,
        assignment: list[ItemAssignment] | None = None,
        block_bytes: int = BLOCK_BYTES,
        batch_bytes: int = BATCH_BYTES,
        max_delay: float = MAX_DELAY,
        tick_interval: float = TICK_INTERVAL,
        window: int = 3,
        retry: RetryPolicy | None = None,
        io_timeout: float = 60.0,
        heartbeat_interval: float = 30.0,
        assignment_interval: float = 60.0,
        scan_interval: float = 60.0,
        auto_resync: bool = False,
    ) -> None:
        if block_bytes % wire.SECTOR or batch_bytes < block_bytes + 4096 or batch_bytes > wire.MAX_BATCH_BYTES // 2:
            raise AgentError("block_bytes must be whole sectors and a batch must hold at least one block")
        self.state_dir = os.path.abspath(state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.requests_dir = os.path.join(self.state_dir, "requests")
        os.makedirs(self.requests_dir, mode=0o700, exist_ok=True)
        self.config_url = config_url
        self.passphrase = passphrase
        self.machine = machine
        self.hostname = hostname or socket.gethostname()
        self.block_bytes = block_bytes
        self.batch_bytes = batch_bytes
        self.max_delay = max_delay
        self.tick_interval = tick_interval
        self.window = max(1, window)
        self.retry = retry or RetryPolicy()
        self.io_timeout = io_timeout
        self.heartbeat_interval = heartbeat_interval
        self.assignment_interval = assignment_interval
        self.scan_interval = scan_interval
        self.auto_resync = auto_resync
        self._config = (JsonClient(config_url, ca_file=config_ca_file, thumbprint=config_thumbprint)
                        if config_url else None)
        self._fixed_assignment = assignment is not None
        self._assignment: list[ItemAssignment] = list(assignment or [])
        if not self._fixed_assignment:
            cached = _read_json(os.path.join(self.state_dir, "assignment.json"), {"items": []})
            self._assignment = [ItemAssignment.from_dict(i) for i in cached.get("items", [])]
        self._assignment_at = 0.0
        self._heartbeat_at = 0.0
        self._runners: dict[uuid.UUID, _ItemRunner] = {}
        self._lock = threading.Lock()
        self._phases_reported: dict[str, str] = {}

    # -- configuration server

    @property
    def credentials(self) -> dict | None:
        return _read_json(os.path.join(self.state_dir, "credentials.json"))

    def register(self) -> str:
        """Register with the configuration server (once); returns the agent id."""
        creds = self.credentials
        if creds:
            return creds["agent_id"]
        if self._config is None or not self.passphrase or not self.machine:
            raise AgentError("registering needs config_url, passphrase and machine")
        body = {"passphrase": self.passphrase, "hostname": self.hostname, "machine": self.machine,
                "version": AGENT_VERSION}
        answer = self.retry.run(lambda: self._config.call("POST", "/api/v1/agents/register", body=body))
        if not answer.get("agent_id") or not answer.get("token"):
            raise AgentError(f"the configuration server's registration answer lacks agent_id/token: {answer}")
        _write_json(os.path.join(self.state_dir, "credentials.json"),
                    {"agent_id": str(answer["agent_id"]), "token": answer["token"], "config_url": self.config_url},
                    mode=0o600)
        log.info("registered as agent %s", answer["agent_id"])
        return str(answer["agent_id"])

    def _agent_call(self, method: str, suffix: str, body: dict | None = None) -> dict:
        creds = self.credentials
        if self._config is None or not creds:
            raise AgentError("the agent is not registered with a configuration server")
        return self._config.call(method, f"/api/v1/agents/{creds['agent_id']}{suffix}", body=body,
                                 token=creds["token"])

    def fetch_assignment(self) -> list[ItemAssignment]:
        """Fetch (and cache, 0600) the items this agent protects."""
        if self._fixed_assignment:
            return self._assignment
        answer = self.retry.run(lambda: self._agent_call("GET", "/assignment"))
        items = [ItemAssignment.from_dict(i) for i in answer.get("items", [])]
        _write_json(os.path.join(self.state_dir, "assignment.json"), {"items": [i.to_dict() for i in items]},
                    mode=0o600)
        with self._lock:
            self._assignment = items
            self._assignment_at = time.monotonic()
            for item_id in [i for i in self._runners if i not in {x.item_id for x in items}]:
                self._runners.pop(item_id).close()
        return items

    def report_event(self, item_id: uuid.UUID, kind: str, message: str, *, seq: int | None = None) -> bool:
        if self._config is None or not self.credentials:
            log.warning("item %s: %s (%s) not reported: no configuration server", item_id, kind, message)
            return False
        body: dict[str, Any] = {"item_id": str(item_id), "kind": kind, "message": message}
        if seq is not None:
            body["seq"] = seq
        try:
            RetryPolicy(max_attempts=3, max_delay=1.0).run(lambda: self._agent_call("POST", "/events", body))
            return True
        except (TransportError, AgentError) as e:
            log.warning("item %s: reporting %s failed: %s", item_id, kind, e)
            return False

    def heartbeat_body(self) -> dict:
        return {"version": AGENT_VERSION, "items": self.status()}

    def send_heartbeat(self) -> dict:
        self._heartbeat_at = time.monotonic()
        return self.retry.run(lambda: self._agent_call("POST", "/heartbeat", self.heartbeat_body()))

    # -- replication

    @property
    def assignment(self) -> list[ItemAssignment]:
        return list(self._assignment)

    def _runner(self, item: ItemAssignment) -> _ItemRunner:
        runner = self._runners.get(item.item_id)
        if runner is not None and runner.item != item:  # another process server, token or disks
            runner.close()
            runner = None
        if runner is not None:
            runner.item = item  # fresh resync flag and bookmarks
        if runner is None:
            runner = self._runners[item.item_id] = _ItemRunner(self, item)
        return runner

    def run_once(self, *, flush: bool = True, scan: bool = False) -> dict[str, dict]:
        """One pass over every assigned item: ship what is there to ship (with ``flush``
        also partial batches; with ``scan`` a checksum scan of unjournaled disks even if
        not due). Errors of one item are logged and kept in its status; the next pass
        retries. Returns the items' status by item id."""
        if self._config is not None and not self._fixed_assignment and self.credentials and (
            not self._assignment_at or time.monotonic() - self._assignment_at >= self.assignment_interval
        ):
            try:
                self.fetch_assignment()
            except (TransportError, AgentError) as e:
                log.warning("fetching the assignment failed (using the cached one): %s", e)
                self._assignment_at = time.monotonic()
        self._take_requests()
        for item in self.assignment:
            runner = self._runner(item)
            try:
                runner.cycle(flush=flush, scan=scan)
                runner.last_error = ""
            except PinMismatch as e:
                runner.last_error = str(e)
                log.error("item %s: %s", item.item_id, e)
                self._assignment_at = 0.0
            except (TransportError, AgentError, OSError) as e:
                runner.last_error = str(e)
                log.warning("item %s: replication pass stopped: %s", item.item_id, e)
                if isinstance(e, TransportError) and e.status in (401, 403):
                    self._assignment_at = 0.0  # the token may have been rotated
        phases = {s["item_id"]: s["phase"] for s in self.status()}
        changed = phases != self._phases_reported
        if self._config is not None and self.credentials and (
            changed or time.monotonic() - self._heartbeat_at >= self.heartbeat_interval
        ):
            self._phases_reported = phases
            try:
                self.send_heartbeat()
            except (TransportError, AgentError) as e:
                log.warning("heartbeat failed: %s", e)
        return {s["item_id"]: s for s in self.status()}

    def caught_up(self) -> bool:
        return all(self._runner(i).caught_up() for i in self.assignment)

    def replicate_until_caught_up(self, *, timeout: float = 600.0, poll: float = 0.05) -> dict[str, dict]:
        """Run passes until every item is in delta replication with nothing left to send."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_once(flush=True, scan=True)
            if self.caught_up():
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not caught up after {timeout:.0f}s: {status}")
            time.sleep(poll)

    def run_forever(self, stop: threading.Event | None = None, *, poll: float = 0.2) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            self.run_once(flush=False)
            stop.wait(poll)

    def request_bookmark(self, item_id: uuid.UUID | str, label: str) -> str:
        """Bookmark the item's stream after every write journaled so far (call it while the
        application is quiesced); returns the bookmark's id. Safe from any thread: the
        request (with the journals' positions now) is left in the state dir and the
        replicating loop takes it on its next pass."""
        item_id = uuid.UUID(str(item_id))
        item = next((i for i in self.assignment if i.item_id == item_id), None)
        if item is None:
            raise AgentError(f"item {item_id} is not assigned to this agent")
        bookmark_id = str(uuid.uuid4())
        _write_bookmark_request(self.requests_dir, item, bookmark_id, label)
        return bookmark_id

    def request_resync(self, item_id: uuid.UUID | str) -> None:
        """Resynchronize the item from the next pass on (it also clears resync_required)."""
        item_id = uuid.UUID(str(item_id))
        if not any(i.item_id == item_id for i in self.assignment):
            raise AgentError(f"item {item_id} is not assigned to this agent")
        write_request(self.state_dir, "resync", str(item_id))

    def _take_requests(self) -> None:
        """Bookmarks asked for through files (``python -m mobility bookmark``)."""
        for name in sorted(os.listdir(self.requests_dir)):
            if not (name.startswith("bookmark-") and name.endswith(".json")):
                continue
            path = os.path.join(self.requests_dir, name)
            req = _read_json(path) or {}
            try:
                item_id = uuid.UUID(str(req["item_id"]))
                item = next((i for i in self.assignment if i.item_id == item_id), None)
                if item is None:
                    raise AgentError(f"item {item_id} is not assigned to this agent")
                positions = req.get("positions")
                self._runner(item).add_bookmark(str(req.get("id") or uuid.uuid4()), str(req.get("label", "")),
                                                positions={str(k): int(v) for k, v in positions.items()}
                                                if positions is not None else None)
            except (AgentError, KeyError, ValueError, TransportError) as e:
                log.warning("bookmark request %s ignored: %s", name, e)
            os.unlink(path)

    def status(self) -> list[dict]:
        return [self._runner(i).status() for i in self.assignment]

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()


def load_item_state(state_dir: str, item_id: uuid.UUID | str) -> dict:
    """The saved replication state of an item (for tools and tests)."""
    raw = SlotFile(os.path.join(os.path.abspath(state_dir), "items", str(uuid.UUID(str(item_id))), "state.slots")).read()
    return json.loads(raw) if raw else {}


def write_request(state_dir: str, kind: str, item_id: str, label: str = "") -> str:
    """Ask a running agent (another process) for a bookmark or a resync, through its state dir."""
    requests_dir = os.path.join(os.path.abspath(state_dir), "requests")
    os.makedirs(requests_dir, mode=0o700, exist_ok=True)
    item = str(uuid.UUID(item_id))
    if kind == "resync":
        path = os.path.join(requests_dir, f"resync-{item}")
        _write_json(path, {"item_id": item})
        return path
    if kind == "bookmark":
        cached = _read_json(os.path.join(os.path.abspath(state_dir), "assignment.json"), {"items": []})
        assigned = next((ItemAssignment.from_dict(i) for i in cached.get("items", []) if i.get("item_id") == item),
                        None)
        if assigned is None:  # no cached assignment (yet): the journals' positions are taken later
            assigned = ItemAssignment(uuid.UUID(item), "", "", "", ())
        return _write_bookmark_request(requests_dir, assigned, str(uuid.uuid4()), label,
                                       with_positions=bool(assigned.disks))
    raise AgentError(f"unknown request {kind!r}")


def guest_freeze(state_dir: str, *, bookmark_id: str | None = None, label: str = "") -> list[str]:
    """The guest's freeze hook: called while the VM's writes are held for a quiesced
    snapshot (VMware Tools runs its freeze scripts then; ``python -m mobility freeze``), it
    bookmarks every assigned item at the journal positions of that very moment. The running
    agent places the bookmarks there, so their points are the quiesced state even though
    the VM writes on once thawed. Returns the request files written."""
    requests_dir = os.path.join(os.path.abspath(state_dir), "requests")
    os.makedirs(requests_dir, mode=0o700, exist_ok=True)
    cached = _read_json(os.path.join(os.path.abspath(state_dir), "assignment.json"), {"items": []})
    bookmark_id = bookmark_id or uuid.uuid4().hex
    label = label or f"quiesced by the guest at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC"
    return [_write_bookmark_request(requests_dir, ItemAssignment.from_dict(raw), bookmark_id, label)
            for raw in cached.get("items", []) if any(d.get("journal_dir") for d in raw.get("disks", []))]


def _write_bookmark_request(requests_dir: str, item: ItemAssignment, bookmark_id: str, label: str, *,
                            with_positions: bool = True) -> str:
    req: dict[str, Any] = {"item_id": str(item.item_id), "id": bookmark_id, "label": label}
    if with_positions:
        req["positions"] = {str(d.index): journal.last_seq(d.journal_dir) for d in item.disks if d.journal_dir}
    path = os.path.join(requests_dir, f"bookmark-{time.time_ns()}-{secrets.token_hex(3)}.json")
    _write_json(path, req)
    return path
