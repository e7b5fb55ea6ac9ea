"""One protected item's runner: its cycle, the shipping of batches with up to ``window`` in
flight, acknowledgements, and batches rebuilt from saved plans. What it sends comes from
the passes mixed in: copy passes and scans (``copy_pass``), the checksum resync pass
(``checksum_pass``), journal batches (``journal_batches``), bookmarks (``bookmarks``), disks
that change shape (``disk_shape``) and the resync's start and end (``resync``). Its saved
state is an ``ItemState`` (``mobility.state``)."""
from __future__ import annotations

import heapq
import os
import time
from concurrent.futures import Future
from typing import Iterator

from mobility import filter as journal
from mobility import wire
from mobility.blockmap import UNKNOWN
from mobility.bookmarks import Bookmarks
from mobility.checksum_pass import ChecksumPass
from mobility.checksums import block_digest
from mobility.copy_pass import CopyPasses
from mobility.disk_shape import DiskShape
from mobility.errors import AgentError, NeedsResync, Waiting
from mobility.item_core import log, pread_exact
from mobility.journal_batches import JournalBatches
from mobility.resync import Resync
from mobility.sender import BARRIER, Built
from mobility.state import (
    PHASE_DELTA,
    PHASE_INITIAL,
    PHASE_RESYNC,
    PHASE_RESYNC_REQUIRED,
    WRITELESS_KEPT,
    ItemState,
)
from mobility.transport import BatchAnswer, TransportError


class ItemRunner(CopyPasses, ChecksumPass, JournalBatches, Bookmarks, DiskShape, Resync):
    """One protected item: its cycle, shipping and acknowledgements (module docstring)."""

    def _start(self) -> None:
        """First sight of the item: continue the process server's seq, note the journal
        bases and start the initial replication, or, when the replica already holds a copy
        of the disks (``seeded``), a full checksum resync against it instead."""
        acked = self.sender.acked_seq()
        capacity = {}
        for d in self.disks:
            cap = self._capacity(d)
            if cap % wire.SECTOR:
                raise AgentError(f"disk {d.key} is {cap} bytes, not a whole number of {wire.SECTOR}-byte sectors")
            capacity[str(d.index)] = cap
        self.state = ItemState(
            item_id=str(self.item.item_id),
            phase=PHASE_INITIAL,
            next_seq=acked + 1,
            acked_seq=acked,
            capacity=capacity,
            block_bytes=self.agent.block_bytes,  # fixed for the item: the block maps use it
            pass_kind="initial",
            pass_disks=sorted(d.index for d in self.disks),
            pass_full=True,
            pass_total=sum(capacity.values()),
            initial_done=False,
            created_at=time.time(),
        )
        if self.item.seeded:
            # The replica was seeded from a copy of the disks (failback), or an agent whose
            # state is gone replicated it: every disk is compared with the replica's digests
            # and only the 4 KiB blocks that differ are sent. Nothing here is evidence of what
            # the replica holds, so the resync is full: ``_begin_resync`` takes the journal
            # base again and forgets the block maps. The configuration server asks for it
            # (``resync``) with the flag; if it did not, the item reports that it needs one.
            self.state.update(phase=PHASE_RESYNC_REQUIRED, initial_done=True, pass_kind="resync",
                              resync_full=True, resync_reported=bool(self.item.resync),
                              resync_reason="the replica already holds a copy of the disks: comparing with it")
        self._set_journal_base()
        self.save()
        for d in self.journaled:  # writes before the base are in the copy (or the compare)
            journal.drop_segments_through(d.journal_dir, acked_seq=self.state.journal_acked[str(d.index)])
        if self.item.seeded:
            log.info("item %s: the replica holds a copy of its %d bytes: compared with it from seq %d",
                     self.item.item_id, self.state.pass_total, acked + 1)
        else:
            log.info("item %s: initial replication of %d bytes starts at seq %d",
                     self.item.item_id, self.state.pass_total, acked + 1)

    def cycle(self, *, flush: bool, scan: bool = False) -> None:
        if self.state is None:
            self._start()
        self.waiting = ""
        try:
            self._take_assigned_bookmarks()
            if self.item.resync_id:
                told = self.item.resync and self.state.resync_taken_id != self.item.resync_id
            else:
                told = self.item.resync and not self.state.resync_flag_taken
            if not self.item.resync and self.state.resync_flag_taken:
                self.state.resync_flag_taken = False  # the configuration server saw it through
                self.save()
            if os.path.exists(self._resync_request_path()) or (told and self.state.phase != PHASE_RESYNC_REQUIRED):
                self.start_resync()
            self._check_disks()
            if self.state.phase == PHASE_RESYNC_REQUIRED:
                self._report_resync()
                if not (told or self.agent.auto_resync):
                    return
                self._begin_resync()
            self._report_pass_done()
            self._ship(self._batches(flush=flush, scan=scan))
            self._report_pass_done()
        except NeedsResync as e:
            self._reload()
            self._require_resync(e.reason, full=e.full)
        except Waiting as e:
            self._reload()  # everything sent so far is saved; the pass goes on from its cursor
            self.waiting = str(e)
        except BaseException:
            # What is on disk is consistent (plans are saved before they are sent); whatever
            # this pass changed in memory since is dropped and redone by the next pass.
            self._reload()
            raise

    def _ship(self, batches: Iterator[Built]) -> None:
        """Send batches with up to ``window`` in flight; acks are taken in seq order."""
        window: list[tuple[Built, Future]] = []
        try:
            for built in batches:
                if built is BARRIER:
                    while window:
                        self._complete(*window.pop(0))
                    self.save()
                    continue
                while len(window) >= self.agent.window:
                    self._complete(*window.pop(0))  # (in memory: saved with the next plan)
                if not built.rebuilt:
                    self.state.inflight.append(built.plan)
                    self.state.next_seq = built.seq + 1
                # One save per batch: its plan (and the cursor or journal position it
                # advanced) is durable before any byte of it leaves (the sender waits for
                # the save), together with the acks taken since the last save.
                saved = self.save_async()
                window.append((built, self.sender.submit(built, acked_floor=self.state.acked_seq, after=saved)))
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

    def _complete(self, built: Built, fut: Future) -> None:
        try:
            answer: BatchAnswer = fut.result()  # a TransportError ends the pass; the plans stay saved
        finally:
            self._give_buffer(built.buffer)
            built.buffer = None
        st = self.state
        if answer.outcome == "gap":
            if answer.acked_seq < st.acked_seq:
                self._resend_writeless(answer.acked_seq)  # raises, unless the loss needs a resync
                raise NeedsResync(
                    f"the process server has batches only up to seq {answer.acked_seq} but had acknowledged "
                    f"{st.acked_seq}: acknowledged data was lost before it reached storage", full=True)
            raise TransportError(answer.message, transient=True)
        if answer.acked_seq >= st.next_seq:
            raise NeedsResync(
                f"the process server acknowledged seq {answer.acked_seq}, beyond the {st.next_seq - 1} "
                "this agent has sent (the agent's state is older than the replica)", full=True)
        # The process server holds exactly these bytes if it took them now, or if this
        # process made the batch (a seq planned here was never sent with other bytes).
        fresh = answer.outcome == "acked" or not built.rebuilt
        present = {d.index for d in self.disks}  # a disk removed meanwhile has no map
        for disk, block, value in built.block_digests:
            if disk in present:
                self._map_by_index(disk).set(block, value if fresh else UNKNOWN)
        for disk, block in built.journal_blocks:
            if disk in present:
                self._map_by_index(disk).forget(block)
        plan = built.plan
        if plan["kind"] == "journal":
            for disk, (_first, last, seg, end) in plan["ranges"].items():
                if disk in st.capacity:
                    st.journal_acked[disk] = last
                    st.journal_pos[disk] = [seg, end]
        st.pass_acked += built.copy_bytes
        st.pass_sent_bytes = st.pass_sent_bytes + built.sent_data
        st.acked_seq = built.seq
        st.last_ack_at = time.time()
        st.inflight = [p for p in st.inflight if p["seq"] != built.seq]
        if plan["kind"] == "journal" and not plan["ranges"]:
            st.acked_writeless = [*st.acked_writeless[1 - WRITELESS_KEPT:], plan]
        elif st.acked_writeless:
            st.acked_writeless = []
        if plan.get("bookmark"):
            st.bookmarks = [b for b in st.bookmarks if b["id"] != plan["bookmark"]["id"]]
        if plan["kind"] == "journal":
            self._drop_due = True  # once the ack is saved
        self.sent_batches += 1
        self.sent_bytes += built.encoded.size


    def _batches(self, *, flush: bool, scan: bool) -> Iterator[Built]:
        st = self.state
        yield from self._resend_inflight()
        if st.disks_due:
            yield self._disks_batch()
        if st.phase in (PHASE_INITIAL, PHASE_RESYNC):
            flags = wire.FLAG_INITIAL if st.phase == PHASE_INITIAL else wire.FLAG_RESYNC
            disks = self._pass_disks()
            if st.phase == PHASE_RESYNC and st.resync_mode == "replica":
                yield from self._replica_pass(disks, flags=flags)
            else:
                yield from self._copy_pass(disks, flags=flags, whole_pass=True)
            yield from self._catch_up(flags)
            log.info("item %s: %s pass planned through seq %d", self.item.item_id, st.phase,
                     st.next_seq - 1)
            st.update(phase=PHASE_DELTA, resync_reason="", resync_full=False, last_scan_at=time.time(),
                      pass_done_seq=st.next_seq - 1, pass_reported=False, initial_done=True)
            if st.copy_after_pass:
                self._begin_disk_copy(st.copy_after_pass)  # disks added during the pass
                self.save()
                return  # the next cycle copies them (a scan now would take over the pass's cursor)
            self.save()
        if self.scanned and (scan or self._scan_due()):
            yield BARRIER  # the scan compares with the block map, which acks update
            if st.cursor[0] >= len(self.scanned) or st.pass_kind != "scan":
                st.update(cursor=[0, 0], pass_full=False, pass_kind="scan", pass_sent=0)
                self._close_views()  # a view left by an earlier pass whose end was not seen
            self._open_views()
            yield from self._copy_pass(self.scanned, flags=0)
            yield BARRIER  # every batch read from the views is in before they go
            self._close_views()
            st.scan_passes += 1
            st.last_scan_at = time.time()
            st.last_scan_sent = st.pass_sent
            self.save()
        if self.journaled:
            yield from self._journal_batches(flush=flush)
        yield from self._ready_bookmarks()

    def _resend_writeless(self, server_seq: int) -> None:
        """The process server holds batches only up to ``server_seq`` but acknowledged more
        (its cache was lost before they reached storage). If every lost batch carried no
        writes (an idle item's ticks, a lone bookmark), nothing of the disks was lost: they
        are planned again with their seqs, ahead of the batches in flight, and the pass
        starts over (``TransportError``). Otherwise this returns and the caller resyncs."""
        st = self.state
        kept = {p["seq"]: p for p in st.acked_writeless}
        lost = range(server_seq + 1, st.acked_seq + 1)
        if not all(seq in kept for seq in lost):
            return
        log.warning("item %s: the process server lost acknowledged batch(es) %d..%d, which carried no writes: "
                    "they are sent again", self.item.item_id, lost[0], lost[-1])
        st.inflight = [*(kept[seq] for seq in lost), *st.inflight]
        st.acked_writeless = [p for p in st.acked_writeless if p["seq"] <= server_seq]
        st.acked_seq = server_seq
        self.save()
        raise TransportError(f"the process server lost batches {lost[0]}..{lost[-1]}, which carried no writes: "
                             "sending them again", transient=True)

    def _resend_inflight(self) -> Iterator[Built]:
        """Batches planned but never answered, rebuilt for the same seq, in order."""
        for plan in list(self.state.inflight):
            built = self._rebuild(plan)
            built.rebuilt = True
            yield built

    def _rebuild(self, plan: dict) -> Built:
        """The batch of a saved plan, for the same seq (without the records of a disk removed
        since: its removal is announced after them)."""
        seq = plan["seq"]
        present = {d.index for d in self.disks}
        if plan["kind"] == "disks":
            return self._encode_disks(plan)
        if plan["kind"] == "ranges":
            # the same ranges, read again; the blocks they touch become unknown in the map
            # (what the source holds now need not be what the plan was made from)
            records, touched = [], set()
            bb = self.bb
            for index, offset, length in plan["ranges"]:
                if index not in present:
                    continue
                disk = next(d for d in self.disks if d.index == index)
                buf = bytearray(length)
                pread_exact(self._fd(disk), memoryview(buf), offset)
                records.append(wire.Record(wire.KIND_WRITE, index, offset, buf))
                touched.update((index, b) for b in range(offset // bb, (offset + length - 1) // bb + 1))
            encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=plan["time_ns"],
                                  records=records, flags=plan["flags"])
            return Built(seq, plan, encoded, journal_blocks=sorted(touched), copy_bytes=plan.get("compared", 0),
                          sent_data=sum(r[2] for r in plan["ranges"] if r[0] in present))
        if plan["kind"] == "copy":
            bb = self.bb
            records, digests = [], []
            for index, block in plan["blocks"]:
                if index not in present:
                    continue
                disk = next(d for d in self.disks if d.index == index)
                cap = self.state.capacity[str(index)]
                buf = bytearray(min(bb, cap - block * bb))
                pread_exact(self._fd(disk), memoryview(buf), block * bb)
                records.append(wire.Record(wire.KIND_WRITE, index, block * bb, buf))
                digests.append((index, block, block_digest(buf)))
            encoded = wire.encode(item_id=self.item.item_id, seq=seq, source_time_ns=plan["time_ns"],
                                  records=records, flags=plan["flags"])
            copy_bytes = sum(len(r.data) for r in records)
            return Built(seq, plan, encoded, block_digests=digests, copy_bytes=copy_bytes)
        picked = []
        for key, (first, last, _seg, _end) in sorted(plan["ranges"].items(), key=lambda kv: int(kv[0])):
            if int(key) not in present:
                continue
            disk = next(d for d in self.disks if d.index == int(key))
            recs = []
            for r in journal.read_journal(disk.journal_dir, after_seq=first - 1):
                if r.seq > last:
                    break
                recs.append(r)
            if not recs or recs[0].seq != first or recs[-1].seq != last or len(recs) != last - first + 1:
                raise NeedsResync(f"journal records {first}..{last} of disk {disk.key} for unacknowledged "
                                   f"batch {seq} are gone", full=False)
            picked.append([(disk, r) for r in recs])
        merged = list(heapq.merge(*picked, key=lambda x: x[1].time_ns))
        built = self._journal_batch(merged, plan.get("bookmark"), flags=plan.get("flags", 0), seq=seq,
                                    tick_ns=plan.get("tick_ns"))
        built.plan = plan
        return built
    def backlog_bytes(self) -> int:
        total = 0
        for d in self.journaled:
            pos = self.state.journal_pos.get(str(d.index))
            total += journal.backlog_bytes(d.journal_dir, tuple(pos) if pos else None)
        return total

    def caught_up(self) -> bool:
        st = self.state
        if st is None or st.phase != PHASE_DELTA or st.inflight or st.bookmarks:
            return False
        if any(str(b["id"]) not in st.bookmark_ids_seen for b in self.item.bookmarks):
            return False
        if self.scanned and st.last_scan_sent:
            return False
        for d in self.journaled:
            newest = journal.last_seq(d.journal_dir)
            if newest > st.journal_acked[str(d.index)] or journal.overflowed(d.journal_dir):
                return False
        return True

    def status(self) -> dict:
        st = self.state
        if st is None:  # not started yet
            return {"item_id": str(self.item.item_id), "phase": "new", "acked_seq": 0, "pass_done_seq": None,
                    "resync_id": "", "backlog_bytes": 0, "progress": None, "resync_reason": "",
                    "last_error": self.last_error, "total_bytes": 0, "compared_bytes": 0, "sent_bytes": 0,
                    "waiting": self.waiting}
        total = st.pass_total or 0
        phase = st.phase
        if phase == PHASE_DELTA and st.pass_done_seq and st.acked_seq < st.pass_done_seq:
            phase = PHASE_INITIAL if st.pass_kind == "initial" else PHASE_RESYNC  # not all acknowledged yet
        progress = None
        if phase in (PHASE_INITIAL, PHASE_RESYNC):
            progress = round(min(0.999, st.pass_acked / total), 4) if total else 0.0
        else:
            progress = 1.0
        if phase == PHASE_RESYNC and st.pass_kind == "disk_copy":
            phase = "disk_copy"  # the full copy of added disks, the others replicating as before
        return {
            "item_id": str(self.item.item_id),
            "phase": phase,
            "acked_seq": st.acked_seq,
            # the last batch of the newest initial copy or resync pass (None while planning it)
            "pass_done_seq": st.pass_done_seq,
            "resync_id": st.resync_taken_id,  # the vault's resync request it serves
            "backlog_bytes": self.backlog_bytes(),
            "progress": progress,
            "resync_reason": st.resync_reason,
            "last_error": self.last_error,
            # the newest resync pass: bytes of source compared with the replica, bytes sent
            "total_bytes": total,
            "compared_bytes": st.pass_compared,
            "sent_bytes": st.pass_sent_bytes,
            "waiting": self.waiting,
        }
