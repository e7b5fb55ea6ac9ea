"""Copy passes of an item's runner: the initial full copy, a resync that compares with the
block map, the full copy of added disks, and scans of disks without a journal (with frozen
views when a snapshot command is set); then the pass's catch-up from the journals."""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from typing import Iterator

from mobility import filter as journal
from mobility import wire
from mobility.assignment import DiskAssignment
from mobility.checksums import block_digest
from mobility.errors import NeedsResync, Waiting
from mobility.item_core import RunnerCore, log, pread_exact
from mobility.sender import Built


class CopyPasses(RunnerCore):
    """Passes that read the disks block by block, and the catch-up after them."""

    def _scan_due(self) -> bool:
        if any(b.get("scan_pass") is not None and b["scan_pass"] > self.state.scan_passes
               for b in self.state.bookmarks):
            return True
        return time.time() - self.state.last_scan_at >= self.agent.scan_interval

    def _copy_pass(self, disks: list[DiskAssignment], *, flags: int, whole_pass: bool = False) -> Iterator[Built]:
        """Read the disks block by block from the saved cursor; ship the blocks that differ
        from the block map (all of them in a full pass).

        Blocks are read over a span of time while writes go on, so after an initial copy or
        a resync the replica is consistent only once the journal records up to where the
        journals stood when the reading ended are applied too: those are the pass's
        *catch-up* (``_catch_up``), and FLAG_INITIAL_DONE goes on the last batch of it."""
        st = self.state
        bb = self.bb
        limit = self.agent.batch_bytes
        full = st.pass_full
        if st.cursor[0] >= len(disks):
            return  # the pass was planned to its end before a restart
        blocks: list[list[int]] = []
        records: list[wire.Record] = []
        digests: list[tuple[int, int, bytes]] = []
        buf = self._take_buffer()
        used = 0
        disk_pos, block = st.cursor
        t_ns = time.time_ns()
        while disk_pos < len(disks):
            disk = disks[disk_pos]
            cap = st.capacity[str(disk.index)]
            nblocks = -(-cap // bb)
            bmap = self._map(disk)
            fd = self._fd(disk)
            while block < nblocks:
                length = min(bb, cap - block * bb)
                if used + length > limit:
                    st.cursor = [disk_pos, block]
                    yield self._copy_batch(flags, blocks, records, digests, t_ns, buf)
                    blocks, records, digests = [], [], []
                    buf = self._take_buffer()
                    used = 0
                    t_ns = time.time_ns()
                view = memoryview(buf)[used : used + length]
                pread_exact(fd, view, block * bb)
                value = block_digest(view)
                if full or not bmap.matches(block, value):
                    blocks.append([disk.index, block])
                    records.append(wire.Record(wire.KIND_WRITE, disk.index, block * bb, view))
                    digests.append((disk.index, block, value))
                    used += length
                    st.pass_sent = st.pass_sent + 1
                else:
                    st.pass_acked += length
                block += 1
            disk_pos, block = disk_pos + 1, 0
        st.cursor = [len(disks), 0]
        catch_up = False
        if whole_pass:
            catch_up = self._end_of_pass()
        last_flags = flags | (wire.FLAG_INITIAL_DONE if flags & wire.FLAG_INITIAL and not catch_up else 0)
        if self._views and st.pass_frozen and not self.journaled:
            last_flags |= wire.FLAG_FROZEN_END  # (sent even when nothing differed)
        if records or last_flags != flags:
            yield self._copy_batch(last_flags, blocks, records, digests, t_ns, buf)
        else:
            self._give_buffer(buf)

    def _end_of_pass(self) -> bool:
        """Note where the journals stand as the reading of a whole pass ends: the pass's
        catch-up ships the records up to there. True if there is a catch-up."""
        st = self.state
        until = {str(d.index): journal.last_seq(d.journal_dir) for d in self.journaled}
        catch_up = any(until[k] > st.journal_planned[k] for k in until)
        st.catch_up_until = until if catch_up else None
        st.consistent_from = until
        return catch_up

    def _copy_batch(self, flags: int, blocks: list[list[int]], records: list[wire.Record],
                    digests: list[tuple[int, int, bytes]], t_ns: int, buf: bytearray) -> Built:
        seq = self.state.next_seq
        flags = self._scan_flags(flags, records)
        plan = {"seq": seq, "kind": "copy", "flags": flags, "blocks": blocks, "time_ns": t_ns}
        encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=t_ns, records=records, flags=flags)
        return Built(seq, plan, encoded, block_digests=digests, copy_bytes=sum(len(r.data) for r in records),
                      buffer=buf)

    def _scan_flags(self, flags: int, records: list[wire.Record]) -> int:
        """A batch holding blocks of a disk without a journal, read from the live disk, says
        so (FLAG_UNFROZEN): read over a span of time, they may come from different moments,
        so the replica's points are not crash-consistent. Journaled disks' reads are made
        consistent by the pass's catch-up."""
        scanned = {d.index for d in self.scanned}
        if flags & wire.FLAG_FROZEN_END:
            return flags
        if scanned and any(r.disk in scanned for r in records):
            # (in a frozen pass too: until its last batch, the replica mixes two moments)
            return flags | wire.FLAG_UNFROZEN
        return flags

    def _open_views(self) -> None:
        """With a snapshot command, a scan pass reads frozen views of the scanned disks,
        taken together: ``<command> create <disk path>...`` prints one view path per disk.
        A view that vanished mid-pass (e.g. after a reboot) is taken again, and then the pass
        is not frozen (its blocks come from two moments). Without a command, or when it
        fails, the pass reads the live disks and says so."""
        command = self.agent.snapshot_command
        st = self.state
        if not command or self._views:
            return
        paths = st.frozen_views or {}
        if st.cursor == [0, 0]:
            st.pass_frozen = True
        if not paths or not all(os.path.exists(p) for p in paths.values()):
            st.pass_frozen = st.cursor == [0, 0]
            disks = self.scanned
            try:
                out = subprocess.run([*shlex.split(command), "create", *(d.path for d in disks)], capture_output=True,
                                     text=True, timeout=600, check=True).stdout.split()
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("item %s: the snapshot command failed (%s): this scan reads the live disks",
                            self.item.item_id, e)
                self.last_error = f"snapshot command failed: {e}"
                st.pass_frozen = False
                return
            if len(out) != len(disks):
                log.warning("item %s: the snapshot command printed %d view paths for %d disks: this scan reads the "
                            "live disks", self.item.item_id, len(out), len(disks))
                st.pass_frozen = False
                return
            paths = {str(d.index): path for d, path in zip(disks, out)}
        st.frozen_views = paths
        self.save()  # a restart finds the views again (or knows to remove them)
        for index, path in paths.items():
            self._views[int(index)] = os.open(path, os.O_RDONLY)

    def _close_views(self) -> None:
        for fd in self._views.values():
            os.close(fd)
        self._views.clear()
        paths = self.state.frozen_views
        if not paths:
            return
        try:
            subprocess.run([*shlex.split(self.agent.snapshot_command or "true"), "remove", *paths.values()],
                           capture_output=True, timeout=600, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("item %s: removing the frozen views failed: %s", self.item.item_id, e)
        self.state.frozen_views = None
        self.save()

    def _catch_up(self, flags: int) -> Iterator[Built]:
        """The journal records written while a pass read the disks, flagged like the pass."""
        st = self.state
        until = st.catch_up_until
        while until:
            self._check_journals()
            # (a disk added since the pass ended is not in it: nothing of it to catch up)
            limits = {d.index: until.get(str(d.index), st.journal_planned[str(d.index)]) for d in self.journaled}
            picked = self._gather(limits)
            done = all(st.journal_planned[k] >= v for k, v in until.items())
            if not picked and not done and self._beyond_end:
                raise Waiting("announcing a disk's new size before its writes past the old end")
            if not picked and not done:
                raise NeedsResync("journal records written during the copy are missing", full=False)
            last = flags | (wire.FLAG_INITIAL_DONE if done and flags & wire.FLAG_INITIAL else 0)
            if done:
                st.catch_up_until = until = None
            yield self._journal_batch(picked, None, flags=last)
