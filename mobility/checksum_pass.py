"""The checksum resync pass of an item's runner (``mobility.agent`` docstring, 3.): the
source is compared with the replica's own 64 KiB group digests and, where groups differ,
its 4 KiB block digests, and only the 4 KiB blocks that differ are sent. While the process
server computes the replica's digests, ``SourceDigests`` hashes the source."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator

from mobility import wire
from mobility.assignment import DiskAssignment
from mobility.blockmap import BlockMap
from mobility.checksums import (
    FINE_BYTES,
    FINE_DIGEST_BYTES,
    GROUP_BLOCKS,
    GROUP_BYTES,
    block_digest,
    fine_digests,
    group_digests,
)
from mobility.errors import AgentError, Waiting
from mobility.item_core import RunnerCore, log, pread_exact
from mobility.sender import BARRIER, Built
from mobility.transport import TransportError

COMPARE_BYTES = 8 * 1024 * 1024  # source read ahead of one request for the replica's 4 KiB digests
MAX_GROUPS_PER_REQUEST = 4096  # the process server's limit per block-digest request
DIGEST_POLL_SECONDS = 0.2  # at most this long between asks for the replica's checksums


class ChecksumPass(RunnerCore):
    """The resync pass that compares the source with the replica's digests."""

    def _replica_pass(self, disks: list[DiskAssignment], *, flags: int) -> Iterator[Built]:
        """A resync pass that compares the source with the replica's own digests and sends
        only the 4 KiB blocks that differ (``mobility.agent`` docstring, 3.)."""
        st = self.state
        if st.cursor[0] >= len(disks):
            return  # the pass was planned to its end before a restart
        if self.bb % GROUP_BYTES:
            st.resync_mode = "blocks"  # blocks not made of whole groups: compare with the block map
            yield from self._copy_pass(disks, flags=flags, whole_pass=True)
            return
        if not st.digest_seq:
            yield BARRIER  # every batch before the pass is in: the replica's digests will cover them
            seq = st.next_seq
            st.digest_seq = seq
            t_ns = time.time_ns()
            plan = {"seq": seq, "kind": "ranges", "flags": flags, "ranges": [], "time_ns": t_ns, "compared": 0}
            yield Built(seq, plan, wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=t_ns, records=[],
                                                flags=flags))
        yield BARRIER
        replica = self._replica_group_digests(disks)
        if replica is None:
            log.info("item %s: the process server serves no replica digests: the resync compares with the "
                     "block map", self.item.item_id)
            st.resync_mode = "blocks"
            yield from self._copy_pass(disks, flags=flags, whole_pass=True)
            return
        source = self._source_digests.result() if self._source_digests is not None else {}
        bb = self.bb
        budget = self.agent.batch_bytes - wire.HEADER.size
        client_seq = st.digest_seq
        read_buf = bytearray(max(COMPARE_BYTES, bb))
        batch: dict[str, Any] = {"ranges": [], "records": [], "digests": [], "forget": [], "used": 0,
                                 "compared": 0, "sent": 0, "t_ns": time.time_ns()}

        def take_batch(last_flags: int) -> Built:
            seq = st.next_seq
            last_flags = self._scan_flags(last_flags, batch["records"])
            plan = {"seq": seq, "kind": "ranges", "flags": last_flags, "ranges": batch["ranges"],
                    "time_ns": batch["t_ns"], "compared": batch["compared"]}
            encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=batch["t_ns"],
                                  records=batch["records"], flags=last_flags)
            built = Built(seq, plan, encoded, block_digests=batch["digests"], journal_blocks=batch["forget"],
                           copy_bytes=batch["compared"], sent_data=batch["sent"])
            batch.update(ranges=[], records=[], digests=[], forget=[], used=0, compared=0, sent=0,
                         t_ns=time.time_ns())
            return built

        disk_pos, block = st.cursor
        while disk_pos < len(disks):
            disk = disks[disk_pos]
            cap = st.capacity[str(disk.index)]
            nblocks = -(-cap // bb)
            fd = self._fd(disk)
            bmap = self._map(disk)
            groups_r, replica_size = replica[disk.index]
            same_size = replica_size == cap
            # The source's group digests hashed while the replica's were computed: a block
            # whose groups all match is not read again. (A write after they were hashed is
            # in the journal, or the block map sends it at the next scan.)
            pre_groups, pre_blocks = source.get(disk.index, (None, None))
            if pre_groups is not None and (not disk.journal_dir) and pre_blocks is None:
                pre_groups = None
            fine_total = -(-cap // FINE_BYTES)
            pending: list[tuple[int, int, int, bytes, list[int]]] = []  # block, offset in read_buf, length, fine, groups
            used_read = 0

            def settle() -> Iterator[Built]:
                """Fetch the replica's 4 KiB digests of the pending blocks' differing groups,
                then plan the differing 4 KiB blocks."""
                theirs: dict[int, bytes] = {}
                wanted = sorted({g for p in pending for g in p[4]}) if same_size else []
                for i in range(0, len(wanted), MAX_GROUPS_PER_REQUEST):
                    chunk = wanted[i : i + MAX_GROUPS_PER_REQUEST]
                    answer = self.sender.replica_digests(disk=disk.index, min_seq=client_seq,
                                                         groups=format_groups(chunk))
                    if answer.state != "ready":
                        raise Waiting("waiting for the replica's checksums")
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
                        st.pass_acked += length
                        self._note_block(disk, bmap, blk, view, batch=None)
                        continue
                    sent = sum(e - b for b, e in runs)
                    if batch["records"] and batch["used"] + sent + len(runs) * wire.RECORD.size > budget:
                        st.cursor = [disk_pos, blk]
                        yield take_batch(flags)
                    for b, e in runs:
                        batch["records"].append(wire.Record(wire.KIND_WRITE, disk.index, blk * bb + b,
                                                            bytes(view[b:e])))
                        batch["ranges"].append([disk.index, blk * bb + b, e - b])
                    batch["used"] += sent + len(runs) * wire.RECORD.size
                    batch["compared"] += length
                    batch["sent"] += sent
                    st.pass_sent = st.pass_sent + 1
                    self._note_block(disk, bmap, blk, view, batch=batch)
                pending.clear()

            while block < nblocks:
                length = min(bb, cap - block * bb)
                if pre_groups is not None and same_size:
                    first, last = block * bb // GROUP_BYTES, -(-(block * bb + length) // GROUP_BYTES)
                    span = slice(first * FINE_DIGEST_BYTES, last * FINE_DIGEST_BYTES)
                    if pre_groups[span] == groups_r[span]:
                        st.pass_compared = st.pass_compared + length
                        st.pass_acked += length
                        self._note_block(disk, bmap, block, None, batch=None,
                                         digest=pre_blocks[block] if pre_blocks is not None else None)
                        block += 1
                        continue
                if used_read + length > len(read_buf):
                    yield from settle()
                    used_read = 0
                view = memoryview(read_buf)[used_read : used_read + length]
                pread_exact(fd, view, block * bb)
                fine = fine_digests(view)
                mine = group_digests(fine)
                g0 = block * bb // GROUP_BYTES
                diff = [g0 + i for i in range(len(mine) // FINE_DIGEST_BYTES)
                        if not same_size or groups_r[(g0 + i) * FINE_DIGEST_BYTES : (g0 + i + 1) * FINE_DIGEST_BYTES]
                        != mine[i * FINE_DIGEST_BYTES : (i + 1) * FINE_DIGEST_BYTES]]
                st.pass_compared = st.pass_compared + length
                if diff:
                    pending.append((block, used_read, length, fine, diff))
                    used_read += length
                else:
                    st.pass_acked += length
                    self._note_block(disk, bmap, block, view, batch=None)
                block += 1
            yield from settle()
            disk_pos, block = disk_pos + 1, 0
        st.cursor = [len(disks), 0]
        self._end_of_pass()
        if batch["records"]:
            yield take_batch(flags)

    def _note_block(self, disk: DiskAssignment, bmap: BlockMap, block: int, view: memoryview | None, *,
                    batch: dict | None, digest: bytes | None = None) -> None:
        """Keep the block map true to a block the resync found equal (``batch`` None) or is
        sending (set once its batch is acknowledged). Only scanned disks compare with the
        map; a journaled disk's entry is forgotten (hashing it would only cost time).
        ``digest``: the block's digest, when it was hashed already (``view`` is then None)."""
        if disk.journal_dir:
            if batch is None:
                bmap.forget(block)
            else:
                batch["forget"].append((disk.index, block))
            return
        value = digest if digest is not None else block_digest(view)
        if batch is None:
            bmap.set(block, value)
        else:
            batch["digests"].append((disk.index, block, value))

    def _replica_group_digests(self, disks: list[DiskAssignment]) -> dict[int, tuple[bytes, int]] | None:
        """The replica's group digests and size of every disk, computed after the pass's
        digest seq: None if the process server serves none; ``Waiting`` while they are
        being computed (the answers already had are kept for the next cycle)."""
        seq = self.state.digest_seq
        if self._replica_groups.get("seq") != seq:
            self._replica_groups = {"seq": seq}
        if self._source_digests is None or self._source_digests.seq != seq:
            # While the replica side reads and hashes the replica, this side hashes the
            # source: the two run at once instead of one after the other.
            if self._source_digests is not None:
                self._source_digests.cancel()
            self._source_digests = SourceDigests(
                seq, [(d.index, d.path, self.state.capacity[str(d.index)], not d.journal_dir) for d in disks],
                self.bb)
        have = self._replica_groups
        for d in disks:
            if d.index in have:
                continue
            if time.monotonic() < self._digests_retry_at:
                raise Waiting("waiting for the replica's checksums")
            answer = self.sender.replica_digests(disk=d.index, min_seq=seq)
            if answer.state == "absent":
                return None
            if answer.state == "pending":
                # Retry-After is in whole seconds; a digest object often comes sooner
                self._digests_retry_at = time.monotonic() + min(max(answer.retry_after, 0.1), DIGEST_POLL_SECONDS)
                raise Waiting("waiting for the replica's checksums")
            groups = -(-answer.disk_size // GROUP_BYTES) if answer.disk_size >= 0 else -1
            if groups < 0 or len(answer.data) != groups * FINE_DIGEST_BYTES:
                raise TransportError(f"the process server sent {len(answer.data)} bytes of group digests for a "
                                     f"disk of {answer.disk_size} bytes", transient=True)
            have[d.index] = (answer.data, answer.disk_size)
        return {d.index: have[d.index] for d in disks}


def format_groups(groups: list[int]) -> str:
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


class SourceDigests:
    """Hashes the source's disks for a resync pass in a thread of its own: per disk, the
    group digests the replica's are compared with and, for scanned disks, the block map's
    digests of every block. ``result()`` waits for it and gives {disk index: (groups,
    block digests or None)}; a disk it could not read is left out (the pass then reads it
    itself and reports the error)."""

    def __init__(self, seq: int, disks: list[tuple[int, str, int, bool]], block_bytes: int) -> None:
        self.seq = seq
        self._disks = disks
        self._bb = block_bytes
        self._cancelled = threading.Event()
        self._out: dict[int, tuple[bytes, list[bytes] | None]] = {}
        self._thread = threading.Thread(target=self._run, name="source-digests", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self) -> dict[int, tuple[bytes, list[bytes] | None]]:
        self._thread.join()
        return dict(self._out)

    def _run(self) -> None:
        bb = self._bb
        buf = bytearray(max(COMPARE_BYTES // bb, 1) * bb)
        for index, path, cap, scanned in self._disks:
            groups: list[bytes] = []
            blocks: list[bytes] | None = [] if scanned else None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                for offset in range(0, cap, len(buf)):
                    if self._cancelled.is_set():
                        return
                    view = memoryview(buf)[: min(len(buf), cap - offset)]
                    pread_exact(fd, view, offset)
                    groups.append(group_digests(fine_digests(view)))
                    if blocks is not None:
                        blocks.extend(block_digest(view[at : at + bb]) for at in range(0, len(view), bb))
            except (OSError, AgentError):
                continue
            finally:
                os.close(fd)
            self._out[index] = (b"".join(groups), blocks)
