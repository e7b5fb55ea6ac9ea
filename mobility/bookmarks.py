"""Bookmarks of an item's runner: app-consistent markers queued at the journals' positions
when they were taken (by the vault, the guest's freeze hook or a request file) and placed
in the stream right after the writes before them."""
from __future__ import annotations

import json
import time
from typing import Iterator

from mobility import filter as journal
from mobility import wire
from mobility.errors import AgentError
from mobility.item_core import RunnerCore, log
from mobility.sender import Built


class Bookmarks(RunnerCore):
    """Queueing bookmarks and sending those with nothing left to wait for."""

    def _take_assigned_bookmarks(self) -> None:
        seen = self.state.bookmark_ids_seen
        for b in self.item.bookmarks:
            if str(b["id"]) in seen:
                continue
            positions = b.get("positions")
            self.add_bookmark(str(b["id"]), str(b.get("label", "")),
                              positions={str(k): int(v) for k, v in positions.items()} if positions else None,
                              group=str(b["group"]) if b.get("group") else None)

    def _ready_bookmarks(self) -> Iterator[Built]:
        """Bookmarks with nothing left to wait for (no journaled disk, or nothing written since
        the last batch) go out in a batch of their own."""
        st = self.state
        while True:
            pending_ids = {p["bookmark"]["id"] for p in st.inflight if p.get("bookmark")}
            ready = [b for b in st.bookmarks if b["id"] not in pending_ids]
            if not ready:
                return
            b = ready[0]
            if not self._consistent(b):
                st.bookmarks = [x for x in st.bookmarks if x["id"] != b["id"]]
                self.save()
                continue
            if any(st.journal_planned.get(k, 0) < v for k, v in (b.get("positions") or {}).items()):
                return
            if st.scan_passes < (b.get("scan_pass") or 0):
                return
            yield self._journal_batch([], b)


    def add_bookmark(self, bookmark_id: str, label: str, *, positions: dict[str, int] | None = None,
                     group: str | None = None) -> None:
        """Queue a bookmark after every write journaled so far (or up to ``positions``: where
        the journals stood when the VM was quiesced, or held at a replication group's
        barrier; ``group`` then names the group point and travels in the label). A bookmark
        whose positions the stream has already gone past is dropped: placed later, its point
        would hold writes made after the quiesce (or barrier) and be consistent in name only."""
        if self.state is None:
            self._start()
        seen = self.state.bookmark_ids_seen
        if bookmark_id in seen:
            return  # the same bookmark, asked for twice (the guest's freeze hook and the vault)
        seen.append(bookmark_id)
        del seen[:-200]
        if positions is None:
            positions = {str(d.index): journal.last_seq(d.journal_dir) for d in self.journaled}
        else:
            positions = {str(d.index): positions.get(str(d.index), 0) for d in self.journaled}
            past = {k: (self.state.journal_planned.get(k, 0), v) for k, v in positions.items()
                    if self.state.journal_planned.get(k, 0) > v}
            if past:
                log.warning("item %s: bookmark %s (%s) dropped: writes made after it was taken were already "
                            "sent (journal seq shipped / at the bookmark, per disk: %s), so its point would not "
                            "be app-consistent", self.item.item_id, bookmark_id, label, past)
                self.dropped_bookmarks += 1
                self.save()
                return
        self.state.bookmarks.append({
            "id": bookmark_id,
            "label": label,
            "requested_ns": time.time_ns(),
            "positions": positions,
            "scan_pass": self.state.scan_passes + 1 if self.scanned else None,
            **({"group": group} if group else {}),
        })
        self.save()


def bookmark_label(bookmark: dict) -> bytes:
    fields = {"id": bookmark["id"], "label": bookmark["label"], "requested_ns": bookmark["requested_ns"]}
    if bookmark.get("group"):
        fields["group"] = bookmark["group"]
    label = json.dumps(fields, sort_keys=True).encode()
    if len(label) > wire.MAX_BOOKMARK_BYTES:
        raise AgentError(f"bookmark label is {len(label)} bytes, over {wire.MAX_BOOKMARK_BYTES}")
    return label
