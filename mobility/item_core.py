"""The part of an item's runner that every pass uses (``RunnerCore``)."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from mobility import filter as journal
from mobility.assignment import DiskAssignment, ItemAssignment
from mobility.blockmap import BlockMap, map_path
from mobility.errors import AgentError
from mobility.sender import Sender
from mobility.slots import SlotFile
from mobility.state import ItemState, StateError

if TYPE_CHECKING:
    from mobility.agent import Agent
    from mobility.checksum_pass import SourceDigests

log = logging.getLogger("lifeboat.mobility")


class RunnerCore:
    """One protected item's runner, the part every pass uses: its saved state, its disks'
    file descriptors and block maps, its sender and read buffers. The passes are mixins
    over it (``mobility.runner.ItemRunner``)."""

    def __init__(self, agent: Agent, item: ItemAssignment) -> None:
        self.agent = agent
        self.item = item
        self.dir = os.path.join(agent.state_dir, "items", str(item.item_id))
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.store = SlotFile(os.path.join(self.dir, "state.slots"))
        self.state: ItemState | None = self._stored_state()
        self.disks = sorted(item.disks, key=lambda d: d.index)
        self.maps: dict[int, BlockMap] = {}
        self.fds: dict[int, int] = {}
        self.sender = Sender(item, window=agent.window, retry=agent.retry, timeout=agent.io_timeout)
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
        self._views: dict[int, int] = {}  # disk index -> fd of its frozen view, during a scan pass
        self._beyond_end = False  # the journal holds a write past a disk's announced end
        self._source_digests: SourceDigests | None = None  # the source's, hashed meanwhile
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
        payload = self.state.to_json()
        drops = []
        if self._drop_due:
            self._drop_due = False
            drops = [(d.journal_dir, self.state.journal_acked[str(d.index)]) for d in self.journaled]

        def write() -> None:
            for w in map_writes:
                w()
            self.store.write(payload)
            for journal_dir, acked in drops:
                journal.drop_segments_through(journal_dir, acked_seq=acked)

        return self._saver.submit(write)

    def _stored_state(self) -> ItemState | None:
        try:
            return ItemState.from_json(self.store.read())
        except StateError as e:
            raise AgentError(f"item {self.item.item_id}: {e} ({self.store.path})") from None

    def _capacity(self, disk: DiskAssignment) -> int:
        fd = self._fd(disk)
        return os.lseek(fd, 0, os.SEEK_END)

    def _fd(self, disk: DiskAssignment) -> int:
        view = self._views.get(disk.index)
        if view is not None and self.state.pass_kind == "scan":  # a scan reads the frozen view
            return view
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
        return self.state.block_bytes

    def _map(self, disk: DiskAssignment) -> BlockMap:
        m = self.maps.get(disk.index)
        if m is None:
            cap = self.state.capacity[str(disk.index)]
            blocks = -(-cap // self.bb)
            m = BlockMap(map_path(self.dir, disk.index), blocks=blocks)
            self.maps[disk.index] = m
        return m

    def close(self) -> None:
        if self._source_digests is not None:
            self._source_digests.cancel()
        self.sender.close()
        self._saver.shutdown(wait=True)
        for fd in [*self.fds.values(), *self._views.values()]:
            os.close(fd)
        self.fds.clear()
        self._views.clear()  # (the views stay for a restart to find: their paths are saved)
        self.store.close()

    @property
    def journaled(self) -> list[DiskAssignment]:
        return [d for d in self.disks if d.journal_dir]

    @property
    def scanned(self) -> list[DiskAssignment]:
        return [d for d in self.disks if not d.journal_dir]

    def _set_journal_base(self, disks: list[DiskAssignment] | None = None) -> None:
        for d in self.journaled if disks is None else [d for d in disks if d.journal_dir]:
            base, pos = journal.end_position(d.journal_dir)
            key = str(d.index)
            self.state.journal_planned[key] = self.state.journal_acked[key] = base
            self.state.journal_pos[key] = self.state.journal_planned_pos[key] = list(pos) if pos else None

    def _reload(self) -> None:
        self._saver.submit(lambda: None).result()  # saves still queued land first
        self.state = self._stored_state()
        self.maps.clear()

    def _map_by_index(self, index: int) -> BlockMap:
        return self._map(next(d for d in self.disks if d.index == index))

    def _take_buffer(self) -> bytearray:
        return self._buffers.pop() if self._buffers else bytearray(max(self.agent.batch_bytes, self.bb))

    def _give_buffer(self, buf: bytearray | None) -> None:
        if buf is not None and len(self._buffers) < self.agent.window + 1:
            self._buffers.append(buf)


def pread_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise AgentError(f"disk ended at {offset + done} while reading {len(view)} bytes at {offset}")
        done += n
