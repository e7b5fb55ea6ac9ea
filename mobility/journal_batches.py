"""Journal batches of an item's runner: the write-filter journals of its disks shipped in
write order (merged by time across disks), aligned to sectors, with bookmarks attached
where they were taken, and the empty "tick" batch of an idle item."""
from __future__ import annotations

import heapq
import os
import time
from typing import Any, Iterator

from mobility import filter as journal
from mobility import wire
from mobility.assignment import DiskAssignment
from mobility.bookmarks import bookmark_label
from mobility.errors import NeedsResync
from mobility.item_core import RunnerCore, log
from mobility.sender import Built
from mobility.state import PHASE_DELTA

TICK_MARGIN_NS = 1_000_000_000  # a writer caught between taking a record's time and appending it


class JournalBatches(RunnerCore):
    """Batches of journal records, in write order, with bookmarks where they were taken."""

    def _check_journals(self) -> None:
        now = time.monotonic()
        for d in self.journaled:
            if journal.overflowed(d.journal_dir):
                raise NeedsResync(f"disk {d.key}: {journal.overflow_reason(d.journal_dir)}", full=False)
        if now >= self._next_reset_check:
            self._next_reset_check = now + 5.0
            for d in self.journaled:
                newest = journal.last_seq(d.journal_dir)
                planned = self.state.journal_planned[str(d.index)]
                if newest < planned:
                    raise NeedsResync(f"the write journal of disk {d.key} restarted (newest seq {newest}, "
                                       f"already shipped up to {planned})", full=False)

    def _tick_due(self) -> bool:
        """An idle item still proves its freshness: when every disk is journaled, nothing is
        in flight and nothing was sent for ``tick_interval``, an empty batch says "the
        source is fully shipped up to here", so recovery points (and RPO) keep up with time."""
        st = self.state
        return (self.agent.tick_interval > 0 and st.phase == PHASE_DELTA and not self.scanned
                and not st.inflight and not st.bookmarks
                and time.monotonic() - self._last_batch_at >= self.agent.tick_interval)

    def _journal_batches(self, *, flush: bool) -> Iterator[Built]:
        st = self.state
        # Writes journaled before this moment are behind the horizon read just below; the
        # margin covers a writer caught between taking a record's time and appending it.
        drained_ns = time.time_ns() - TICK_MARGIN_NS
        first_round = True
        # one pass ships what was journaled when it began: a busy writer cannot keep it going
        horizon = {}
        for d in self.journaled:
            key = str(d.index)
            pos = st.journal_planned_pos.get(key)
            horizon[d.index] = journal.end_position(
                d.journal_dir, start=(st.journal_planned[key], tuple(pos) if pos else None))[0]
        while True:
            self._check_journals()
            sent_ids = {p["bookmark"]["id"] for p in st.inflight if p.get("bookmark")}
            bookmark = next((b for b in st.bookmarks if b.get("positions") and b["id"] not in sent_ids), None)
            limits = {d.index: min(horizon[d.index], bookmark["positions"].get(str(d.index), 0)) if bookmark
                      else horizon[d.index] for d in self.journaled}
            before = (dict(st.journal_planned), dict(st.journal_planned_pos))
            picked = self._gather(limits)
            attach = None
            if bookmark and all(st.journal_planned[k] >= bookmark["positions"].get(k, 0)
                                for k in st.journal_planned) \
                    and st.scan_passes >= (bookmark.get("scan_pass") or 0):
                attach = bookmark
            if attach is not None and not self._consistent(attach):
                log.warning("item %s: bookmark %s dropped: it was taken before the last copy pass ended, so "
                            "the replica cannot be app-consistent there", self.item.item_id, attach["id"])
                st.bookmarks = [b for b in st.bookmarks if b["id"] != attach["id"]]
                st.journal_planned, st.journal_planned_pos = before
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
                st.journal_planned, st.journal_planned_pos = before
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
            after = st.journal_planned[key]
            limit = limits[d.index]
            if limit is not None and after >= limit:
                continue
            pos = st.journal_planned_pos.get(key)
            streams.append(self._journal_stream(d, after, limit, tuple(pos) if pos else None))
        picked = []
        used = 0
        self._beyond_end = False
        for disk, rec in heapq.merge(*streams, key=lambda x: x[1].time_ns):
            if rec.offset + len(rec.data) > st.capacity.get(str(disk.index), 0):
                # the disk grew after this cycle checked it: the next cycle announces its
                # new size, and this write goes after that
                self._beyond_end = self._gathered_full = True
                break
            cost = wire.RECORD.size + len(rec.data) + wire.SECTOR * 2
            if cost > wire.MAX_BATCH_BYTES // 2:
                raise NeedsResync(f"a single write of {len(rec.data)} bytes to disk {disk.key} is too large "
                                   "for a batch", full=False)
            if picked and used + cost > budget:
                self._gathered_full = True
                break
            picked.append((disk, rec))
            used += cost
            st.journal_planned[str(disk.index)] = rec.seq
            st.journal_planned_pos[str(disk.index)] = [rec.segment, rec.end]
        return picked

    def _journal_stream(self, disk: DiskAssignment, after: int, limit: int | None,
                        pos: tuple[int, int] | None) -> Iterator[tuple[DiskAssignment, journal.JournalRecord]]:
        expected = after + 1
        for rec in journal.read_journal(disk.journal_dir, after_seq=after, position=pos):
            if limit is not None and rec.seq > limit:
                return
            if rec.seq != expected:
                raise NeedsResync(f"the journal of disk {disk.key} jumps from seq {expected - 1} to {rec.seq}: "
                                   "writes between them were not journaled", full=False)
            expected += 1
            yield disk, rec

    def _consistent(self, bookmark: dict) -> bool:
        since = self.state.consistent_from or {}
        return all(bookmark["positions"].get(k, 0) >= v for k, v in since.items()) if bookmark.get("positions") \
            else True

    def _journal_batch(self, picked, bookmark: dict | None, *, flags: int = 0, seq: int | None = None,
                       tick_ns: int | None = None) -> Built:
        st = self.state
        seq = st.next_seq if seq is None else seq
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
            records.append(wire.Record(wire.KIND_BOOKMARK, 0, 0, bookmark_label(bookmark)))
            plan["bookmark"] = bookmark
            t_ns = max(t_ns, bookmark["requested_ns"])
        encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=t_ns or time.time_ns(),
                              records=records, flags=flags)
        return Built(seq, plan, encoded, journal_blocks=sorted(touched))

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
