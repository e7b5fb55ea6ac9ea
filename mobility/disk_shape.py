"""Disks that change shape, in an item's runner (``mobility.agent`` docstring, 4.): a disk
that grew or joined is announced by a disk record before anything is written past its old
end, a joined disk gets its own full copy, a disk that left is announced with size 0."""
from __future__ import annotations

import os
import time

from mobility import filter as journal
from mobility import wire
from mobility.assignment import DiskAssignment
from mobility.errors import AgentError
from mobility.item_core import RunnerCore, log
from mobility.sender import Built
from mobility.state import PHASE_DELTA, PHASE_INITIAL, PHASE_RESYNC, PHASE_RESYNC_REQUIRED


class DiskShape(RunnerCore):
    """Disks that grew, joined or left the item."""


    def _check_disks(self) -> None:
        """Disks that changed shape since the last cycle (``mobility.agent`` docstring, 4.)."""
        st = self.state
        caps = st.capacity
        due = st.disks_due
        changed = False
        for key in [k for k in caps if k not in {str(d.index) for d in self.disks}]:
            log.info("item %s: disk %s left the item: its replication stops", self.item.item_id, key)
            self._forget_disk(key)
            due[key] = 0
            changed = True
        added: list[DiskAssignment] = []
        shrunk = ""
        for d in self.disks:
            key = str(d.index)
            cap = self._capacity(d)
            known = caps.get(key)
            if cap == known:
                continue
            if cap % wire.SECTOR:
                raise AgentError(f"disk {d.key} is {cap} bytes, not a whole number of {wire.SECTOR}-byte sectors")
            changed = True
            caps[key] = due[key] = cap
            old_map = self.maps.pop(d.index, None)
            if old_map is not None:  # what it learnt so far, after the saves queued; reopened at the new size
                self._saver.submit(old_map.take_changes()).result()
            if known is None:
                added.append(d)
                log.info("item %s: disk %s (%d bytes) joined the item", self.item.item_id, d.key, cap)
            elif cap > known:
                log.info("item %s: disk %s grew from %d to %d bytes", self.item.item_id, d.key, known, cap)
            else:
                shrunk = f"disk {d.key} shrank from {known} to {cap} bytes"
        if not changed:
            return
        st.shape_changed = True
        if added:
            self._add_disks(added)
        if shrunk and st.phase != PHASE_RESYNC_REQUIRED:
            self._require_resync(f"{shrunk}; the replica is compared with it again", full=True)
            return
        self.save()

    def _add_disks(self, added: list[DiskAssignment]) -> None:
        """Disks that joined the item: their journals start here, and their full copy runs
        now (in delta), after the pass under way, or within the resync still to come."""
        st = self.state
        self._set_journal_base(added)
        for d in added:
            if d.journal_dir:  # writes before the base are in the copy
                journal.drop_segments_through(d.journal_dir, acked_seq=st.journal_acked[str(d.index)])
        indexes = [d.index for d in added]
        if st.phase == PHASE_DELTA:
            self._begin_disk_copy(indexes)
        elif st.phase in (PHASE_INITIAL, PHASE_RESYNC):
            st.copy_after_pass = sorted(set(st.copy_after_pass or []) | set(indexes))

    def _begin_disk_copy(self, indexes: list[int]) -> None:
        """The full copy of disks added to the item: a pass over those disks only."""
        st = self.state
        disks = [d for d in self.disks if d.index in set(indexes)]
        for d in disks:
            self._map(d).forget_all()
        st.update(phase=PHASE_RESYNC, resync_mode="blocks", pass_kind="disk_copy",
                  pass_disks=sorted(d.index for d in disks), cursor=[0, 0], pass_full=True, pass_acked=0,
                  pass_sent=0, pass_compared=0, pass_sent_bytes=0,
                  pass_total=sum(st.capacity[str(d.index)] for d in disks), pass_done_seq=None,
                  pass_reported=False, catch_up_until=None, copy_after_pass=[])
        log.info("item %s: the full copy of added disk(s) %s starts", self.item.item_id,
                 ", ".join(d.key for d in disks))

    def _forget_disk(self, key: str) -> None:
        """A disk that left the item: its state goes, and a pass under way skips it."""
        st = self.state
        for per_disk in (st.capacity, st.journal_planned, st.journal_acked, st.journal_pos, st.journal_planned_pos,
                         st.catch_up_until or {}, st.consistent_from or {}):
            per_disk.pop(key, None)
        for b in st.bookmarks:
            (b.get("positions") or {}).pop(key, None)
        index = int(key)
        order = st.pass_disks
        if order and index in order:
            at, cursor = order.index(index), st.cursor
            if at < cursor[0]:
                cursor[0] -= 1
            elif at == cursor[0]:
                cursor[1] = 0
            order.remove(index)
        st.copy_after_pass = [i for i in st.copy_after_pass or [] if i != index]
        self.maps.pop(index, None)
        fd = self.fds.pop(index, None)
        if fd is not None:
            os.close(fd)

    def _pass_disks(self) -> list[DiskAssignment]:
        """The disks of the pass under way (all of them unless it copies added disks)."""
        order = self.state.pass_disks
        if order is None:
            return self.disks
        return [d for d in self.disks if d.index in set(order)]

    def _disks_batch(self) -> Built:
        """Announce disks that changed size (0: left the item), before anything is written
        past their old end."""
        st = self.state
        plan = {"seq": st.next_seq, "kind": "disks", "flags": 0, "time_ns": time.time_ns(),
                "sizes": dict(sorted(st.disks_due.items(), key=lambda kv: int(kv[0])))}
        st.disks_due = {}
        return self._encode_disks(plan)

    def _encode_disks(self, plan: dict) -> Built:
        records = [wire.Record(wire.KIND_DISK, int(k), int(v), b"") for k, v in plan["sizes"].items()]
        return Built(plan["seq"], plan, wire.encode(item_id=self.item.item_id, seq=plan["seq"],
                                                     source_time_ns=plan["time_ns"], records=records))
