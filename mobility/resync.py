"""Resynchronization of an item's runner: an item that lost track of changes is reported
and stops shipping; when told (or on its own with ``auto_resync``) it starts a resync pass
(``mobility.agent`` docstring, 3.) and reports its end."""
from __future__ import annotations

import os
import time
from typing import Iterator

from mobility import filter as journal
from mobility import wire
from mobility.errors import NeedsResync
from mobility.item_core import RunnerCore, log
from mobility.sender import Built
from mobility.state import PHASE_INITIAL, PHASE_RESYNC, PHASE_RESYNC_REQUIRED


class Resync(RunnerCore):
    """Reporting an item that needs a resync, starting one, and reporting its end."""

    def _report_pass_done(self) -> None:
        """Tell the configuration server once every batch of a resynchronization is in."""
        st = self.state
        done = st.pass_done_seq
        if st.pass_kind == "resync" and done and st.acked_seq >= done and not st.pass_reported:
            if self.agent.report_event(self.item.item_id, "resync_complete",
                                       f"resynchronization sent through seq {done}", seq=done):
                st.pass_reported = True
                self.save()

    def _require_resync(self, reason: str, *, full: bool) -> None:
        st = self.state
        log.warning("item %s needs resynchronization: %s", self.item.item_id, reason)
        st.phase = PHASE_RESYNC_REQUIRED
        st.resync_reason = reason
        st.resync_full = bool(st.resync_full) or full
        st.resync_reported = False
        self.save()
        self._report_resync()

    def _report_resync(self) -> None:
        st = self.state
        if st.resync_reported:
            return
        if self.agent.report_event(self.item.item_id, "resync_required", st.resync_reason):
            st.resync_reported = True
            self.save()

    def _resync_request_path(self) -> str:
        return os.path.join(self.agent.requests_dir, f"resync-{self.item.item_id}")

    def _begin_resync(self) -> None:
        """Start the checksum-based resynchronization of a RESYNC_REQUIRED item."""
        st = self.state
        full = bool(st.resync_full)
        if self.item.resync:
            st.resync_flag_taken = True  # one resync per time the configuration server asks
            st.resync_taken_id = self.item.resync_id
        if full:
            # the process server lost batches: go on right after what it still has
            acked = self.sender.acked_seq()
            st.update(acked_seq=acked, next_seq=acked + 1, inflight=[])
        elif st.inflight:
            # batches planned before the trouble still own their seqs: deliver them first
            # (as empty batches if their journal records are gone; the resync covers them)
            self._ship(self._resend_or_fill())
        if st.bookmarks:
            log.warning("item %s: %d pending bookmark(s) dropped: a resync breaks app consistency",
                        self.item.item_id, len(st.bookmarks))
        initial = not st.initial_done
        if initial:
            # the initial copy never completed: it starts over (a resync pass could not
            # mark the replica complete)
            full = True
        log.info("item %s: %s starts (%s)", self.item.item_id,
                 "the initial replication" if initial else "full resynchronization" if full
                 else "checksum resynchronization", st.resync_reason)
        self._set_journal_base()
        if full:
            for d in self.disks:
                self._map(d).forget_all()
                self._map(d).flush()
        if full and st.shape_changed:
            # the process server may have lost a size announcement with the batches it lost
            st.disks_due = {**{str(d.index): st.capacity[str(d.index)] for d in self.disks},
                               **{k: v for k, v in (st.disks_due or {}).items() if v == 0}}
        st.update(phase=PHASE_INITIAL if initial else PHASE_RESYNC, cursor=[0, 0], pass_full=full,
                  pass_disks=sorted(d.index for d in self.disks), copy_after_pass=[],
                  pass_kind="initial" if initial else "resync", pass_acked=0, pass_sent=0,
                  resync_mode="replica", digest_seq=None, pass_compared=0, pass_sent_bytes=0,
                  pass_total=sum(st.capacity.values()), bookmarks=[], pass_done_seq=None, pass_reported=False,
                  catch_up_until=None)
        self.save()
        for d in self.journaled:
            journal.drop_segments_through(d.journal_dir, acked_seq=st.journal_acked[str(d.index)])
            journal.clear_overflow(d.journal_dir)
        try:
            os.unlink(self._resync_request_path())
        except FileNotFoundError:
            pass

    def _resend_or_fill(self) -> Iterator[Built]:
        for plan in list(self.state.inflight):
            try:
                built = self._rebuild(plan)
            except NeedsResync:
                encoded = wire.encode(item_id=self.item.item_id, seq=plan["seq"], source_time_ns=time.time_ns(),
                                      records=[])
                built = Built(plan["seq"], plan, encoded)
            built.rebuilt = True
            yield built

    def start_resync(self) -> None:
        """Resynchronize now (an admin's "Resynchronize", or after resync_required)."""
        if self.state is None:
            self._start()
        st = self.state
        if st.phase == PHASE_INITIAL:
            log.info("item %s: resynchronization asked for during the initial replication: nothing to do",
                     self.item.item_id)
            st.resync_flag_taken = bool(self.item.resync)
            if self.item.resync:
                st.resync_taken_id = self.item.resync_id
            self.save()
            try:
                os.unlink(self._resync_request_path())
            except FileNotFoundError:
                pass
            return
        if st.phase != PHASE_RESYNC_REQUIRED:
            # Asked for while this agent knows of no trouble: an admin (or the vault) doubts
            # the replica, so the block map is no evidence either: every block is sent again.
            st.phase = PHASE_RESYNC_REQUIRED
            st.resync_reason = "resynchronization requested"
            st.resync_full = True
            st.resync_reported = True  # asked for, not discovered: nothing to report
            self.save()
        self._begin_resync()
