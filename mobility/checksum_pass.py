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
DIGEST_POLL_SECONDS = 0.05  # at most this long between asks for the replica's checksums (a few
# hundred bytes each, only while they are being computed: the pass starts as soon as they are there)
RESYNC_BATCH_BYTES = 2 * 1024 * 1024  # at most this much data per resync batch: the replica side applies
# the first batches while the rest of the disk is still compared


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
        budget = min(self.agent.batch_bytes, RESYNC_BATCH_BYTES) - wire.HEADER.size
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
            # whose groups all match is not read again, and of a block whose groups do not
            # all match only the differing groups are read. (A write after they were hashed
            # is in the journal, or the block map sends it at the next scan.)
            pre_groups, pre_blocks = source.get(disk.index, (None, None))
            if pre_groups is not None and (not disk.journal_dir) and pre_blocks is None:
                pre_groups = None
            fine_total = -(-cap // FINE_BYTES)
            # Blocks with differing groups, until the replica's 4 KiB digests of those groups
            # are fetched: (block, length, differing groups, parts read, offset in read_buf
            # of the whole block when it was read whole, the block's digest when known). A
            # part: (offset in read_buf, offset in the block, bytes, their 4 KiB digests).
            pending: list[tuple[int, int, list[int], list[tuple[int, int, int, bytes]], int | None, bytes | None]] = []
            used_read = 0

            def settle() -> Iterator[Built]:
                """Fetch the replica's 4 KiB digests of the pending blocks' differing groups,
                then plan the differing 4 KiB blocks."""
                theirs: dict[int, bytes] = {}
                wanted = sorted({g for p in pending for g in p[2]}) if same_size else []
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
                for blk, length, diff, parts, whole_off, digest in pending:
                    differing = set(diff)
                    runs: list[list[int]] = []  # [start, end) within the block, offset in read_buf of start
                    first_fine = blk * bb // FINE_BYTES
                    for buf_off, start, nbytes, fine in parts:
                        joinable = False  # runs join only within one part (one piece of read_buf)
                        for local in range(-(-nbytes // FINE_BYTES)):
                            j = first_fine + start // FINE_BYTES + local
                            g = j // GROUP_BLOCKS
                            if g not in differing:
                                joinable = False
                                continue
                            other = theirs.get(g)
                            k = (j - g * GROUP_BLOCKS) * FINE_DIGEST_BYTES
                            if other is not None and other[k : k + FINE_DIGEST_BYTES] == \
                                    fine[local * FINE_DIGEST_BYTES : (local + 1) * FINE_DIGEST_BYTES]:
                                joinable = False
                                continue
                            b = start + local * FINE_BYTES
                            e = min(start + nbytes, b + FINE_BYTES)
                            if joinable:
                                runs[-1][1] = e
                            else:
                                runs.append([b, e, buf_off + local * FINE_BYTES])
                            joinable = True
                    view = memoryview(read_buf)[whole_off : whole_off + length] if whole_off is not None else None
                    if not runs:  # every 4 KiB block the same after all
                        st.pass_acked += length
                        self._note_block(disk, bmap, blk, view, batch=None, digest=digest)
                        continue
                    sent = sum(e - b for b, e, _ in runs)
                    if batch["records"] and batch["used"] + sent + len(runs) * wire.RECORD.size > budget:
                        st.cursor = [disk_pos, blk]
                        yield take_batch(flags)
                    for b, e, at in runs:
                        batch["records"].append(wire.Record(wire.KIND_WRITE, disk.index, blk * bb + b,
                                                            bytes(read_buf[at : at + e - b])))
                        batch["ranges"].append([disk.index, blk * bb + b, e - b])
                    batch["used"] += sent + len(runs) * wire.RECORD.size
                    batch["compared"] += length
                    batch["sent"] += sent
                    st.pass_sent = st.pass_sent + 1
                    self._note_block(disk, bmap, blk, view, batch=batch, digest=digest)
                pending.clear()

            while block < nblocks:
                length = min(bb, cap - block * bb)
                g0 = block * bb // GROUP_BYTES
                ngroups = -(-length // GROUP_BYTES)
                if pre_groups is not None and same_size:
                    span = slice(g0 * FINE_DIGEST_BYTES, (g0 + ngroups) * FINE_DIGEST_BYTES)
                    if pre_groups[span] == groups_r[span]:
                        st.pass_compared = st.pass_compared + length
                        st.pass_acked += length
                        self._note_block(disk, bmap, block, None, batch=None,
                                         digest=pre_blocks[block] if pre_blocks is not None else None)
                        block += 1
                        continue
                    parts = self._read_groups(fd, read_buf, used_read, block, length, pre_groups, groups_r)
                    if parts is None:  # no room left in read_buf
                        yield from settle()
                        used_read = 0
                        parts = self._read_groups(fd, read_buf, used_read, block, length, pre_groups, groups_r)
                    if parts:
                        st.pass_compared = st.pass_compared + length
                        diff = [g0 + start // GROUP_BYTES + i for _, start, nbytes, _ in parts
                                for i in range(-(-nbytes // GROUP_BYTES))]
                        pending.append((block, length, diff, parts, None,
                                        pre_blocks[block] if pre_blocks is not None else None))
                        used_read = parts[-1][0] + parts[-1][2]
                        block += 1
                        continue
                    # a group changed on the source since it was hashed: the block is read whole
                if used_read + length > len(read_buf):
                    yield from settle()
                    used_read = 0
                view = memoryview(read_buf)[used_read : used_read + length]
                pread_exact(fd, view, block * bb)
                fine = fine_digests(view)
                mine = group_digests(fine)
                diff = [g0 + i for i in range(len(mine) // FINE_DIGEST_BYTES)
                        if not same_size or groups_r[(g0 + i) * FINE_DIGEST_BYTES : (g0 + i + 1) * FINE_DIGEST_BYTES]
                        != mine[i * FINE_DIGEST_BYTES : (i + 1) * FINE_DIGEST_BYTES]]
                st.pass_compared = st.pass_compared + length
                if diff:
                    pending.append((block, length, diff, [(used_read, 0, length, fine)], used_read, None))
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

    def _read_groups(self, fd: int, read_buf: bytearray, at: int, block: int, length: int, pre_groups: bytes,
                     groups_r: bytes) -> list[tuple[int, int, int, bytes]] | None:
        """Read into ``read_buf`` from ``at`` the groups of a block whose source digest (hashed
        by ``SourceDigests``) differs from the replica's, each run of adjacent ones at once,
        with their 4 KiB digests: the parts for ``settle``. None if they do not fit in
        ``read_buf`` from ``at``; [] if a group read no longer has the digest it was hashed
        with (written since: the caller reads the whole block, so that the block map records
        what the replica will hold)."""
        bb, d = self.bb, FINE_DIGEST_BYTES
        g0 = block * bb // GROUP_BYTES
        runs: list[list[int]] = []  # [first, end) groups of the block
        for i in range(-(-length // GROUP_BYTES)):
            g = g0 + i
            if pre_groups[g * d : (g + 1) * d] != groups_r[g * d : (g + 1) * d]:
                if runs and runs[-1][1] == i:
                    runs[-1][1] = i + 1
                else:
                    runs.append([i, i + 1])
        if at + sum(min(b * GROUP_BYTES, length) - a * GROUP_BYTES for a, b in runs) > len(read_buf):
            return None
        parts: list[tuple[int, int, int, bytes]] = []
        for a, b in runs:
            start = a * GROUP_BYTES
            nbytes = min(b * GROUP_BYTES, length) - start
            view = memoryview(read_buf)[at : at + nbytes]
            pread_exact(fd, view, block * bb + start)
            fine = fine_digests(view)
            if group_digests(fine) != pre_groups[(g0 + a) * d : (g0 + b) * d]:
                return []
            parts.append((at, start, nbytes, fine))
            at += nbytes
        return parts

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
                self._digests_retry_at = time.monotonic() + min(max(answer.retry_after, 0), DIGEST_POLL_SECONDS)
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
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for offset in range(0, cap, len(buf)):
                    if self._cancelled.is_set():
                        return
                    if offset + len(buf) < cap:  # the next piece is read from the disk while this one is hashed
                        os.posix_fadvise(fd, offset + len(buf), len(buf), os.POSIX_FADV_WILLNEED)
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
