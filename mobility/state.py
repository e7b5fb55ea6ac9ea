"""An item's crash-safety state: what the agent saves before every batch it sends.

``ItemState`` is saved as JSON in the item's ``state.slots`` (``mobility.slots.SlotFile``)
before any byte of a batch leaves, so after a crash the agent resumes from exactly what the
saved state says: every field's docstring states what it guarantees then. Dictionaries keyed
by disk keep the JSON form of the key (the disk index as a string), so the saved file and
the structure in memory are the same shape.

Loading is tolerant by design: a key missing from an older file takes the field's default
(chosen so the older agent's behaviour carries on), and a key this agent does not know
(written by a newer agent, or left from an older one) is dropped with a log line: carried
over unread it could contradict the fields this agent changes. The few fields without which
an item cannot be continued (``IDENTITY``) must be present; a file lacking them is an error.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from mobility.slots import SlotFile

log = logging.getLogger("lifeboat.mobility")

PHASE_INITIAL = "initial"
PHASE_DELTA = "delta"
PHASE_RESYNC_REQUIRED = "resync_required"
PHASE_RESYNC = "resync"

WRITELESS_KEPT = 32
"""How many acknowledged batches without writes an item keeps the plans of (``acked_writeless``)."""


class StateError(ValueError):
    """The saved state cannot be read as an item's state; the message says why."""


@dataclass(slots=True, kw_only=True)
class ItemState:
    """One protected item's replication state, as saved (module docstring)."""

    # -- identity and the stream's sequence numbers
    item_id: str
    """The item this state belongs to."""
    phase: str
    """``initial``, ``delta``, ``resync_required`` or ``resync``: the pass a restart continues.
    ``resync_required`` survives a crash, so an item that lost track of changes never ships
    deltas again before it is resynchronized."""
    next_seq: int
    """The seq the next new batch gets. Every seq below it was planned, and the plan of every
    one not yet acknowledged is in ``inflight``: a restart never reuses a seq for other bytes."""
    acked_seq: int
    """The newest seq the process server acknowledged (as saved: acks taken since the last
    save are taken again from the resent batches' answers)."""
    capacity: dict[str, int]
    """Per disk, its size as last announced to (or copied for) the process server; the journal
    is read no further than it."""
    block_bytes: int
    """The item's block size, fixed when its replication started: the block maps use it."""
    created_at: float = 0.0
    """When the item's replication started here (seconds since the epoch)."""

    # -- journals (per journaled disk)
    journal_planned: dict[str, int] = field(default_factory=dict)
    """The newest journal seq put in a planned batch (saved with that batch's plan)."""
    journal_planned_pos: dict[str, list[int] | None] = field(default_factory=dict)
    """Where in the journal (segment, end offset) ``journal_planned`` ends, to read on from."""
    journal_acked: dict[str, int] = field(default_factory=dict)
    """The newest journal seq in an acknowledged batch: segments up to it may be deleted, and
    are deleted only after this is saved."""
    journal_pos: dict[str, list[int] | None] = field(default_factory=dict)
    """Where in the journal ``journal_acked`` ends (the backlog is counted from there)."""

    # -- the pass under way (initial copy, resync, copy of added disks, scan)
    cursor: list[int] = field(default_factory=lambda: [0, 0])
    """(disk position in the pass, block) where the pass reads on: every block before it is in
    a saved plan or was found equal."""
    pass_kind: str = ""
    """``initial``, ``resync``, ``disk_copy`` or ``scan``: what the cursor walks over."""
    pass_disks: list[int] | None = None
    """The disk indexes the pass covers, in order (None: every disk of the item)."""
    pass_full: bool = False
    """Every block is sent (the block map is no evidence)."""
    pass_total: int = 0
    """Bytes of source the pass covers (progress)."""
    pass_acked: int = 0
    """Bytes of source the pass has found equal or got acknowledged (progress)."""
    pass_sent: int = 0
    """Blocks the pass has planned to send."""
    pass_compared: int = 0
    """Bytes of source a resync compared with the replica."""
    pass_sent_bytes: int = 0
    """Bytes of disk data the resync's acknowledged batches carried."""
    pass_done_seq: int | None = None
    """The last batch of the newest initial copy or resync (None while it is planned): once
    acknowledged, the replica is whole again."""
    pass_reported: bool = False
    """The end of the resync at ``pass_done_seq`` was reported to the configuration server."""
    pass_frozen: bool = False
    """The scan under way reads frozen views taken together from its first block on."""
    frozen_views: dict[str, str] | None = None
    """Per scanned disk, the path of the frozen view the scan under way reads: a restart reads
    the same views on, or removes them."""
    catch_up_until: dict[str, int] | None = None
    """Per journaled disk, the journal seq the pass's catch-up ships up to (None: no catch-up
    due). A restart finishes the catch-up before anything else is planned."""
    consistent_from: dict[str, int] = field(default_factory=dict)
    """Per journaled disk, the journal seq from which the replica is consistent (where the
    journals stood when the last copy pass ended): a bookmark before it is dropped."""
    copy_after_pass: list[int] = field(default_factory=list)
    """Disks added while a pass was under way: their full copy starts when it ends."""
    initial_done: bool = True
    """The initial copy completed once (a state saved before this field existed had)."""

    # -- scans of disks without a journal
    scan_passes: int = 0
    """Scan passes completed: a bookmark waits for the scan after it was taken."""
    last_scan_at: float = 0.0
    """When the last scan (or copy pass) ended: the next scan is due ``scan_interval`` later."""
    last_scan_sent: int = 0
    """Blocks the last scan sent (nonzero: the item is not caught up)."""

    # -- resynchronization
    resync_reason: str = ""
    """Why the item needs (or gets) a resync, for the configuration server and the status."""
    resync_full: bool = False
    """The resync cannot trust the replica (acknowledged batches were lost): every block goes."""
    resync_reported: bool = False
    """``resync_required`` was reported to the configuration server (it is reported until then)."""
    resync_mode: str = "blocks"
    """``replica`` (compare with the replica's digests) or ``blocks`` (with the block map)."""
    digest_seq: int | None = None
    """The empty batch after which the replica's digests are computed for the resync under
    way (None: not sent yet)."""
    resync_flag_taken: bool = False
    """The configuration server's resync flag was taken: it is not taken twice before the
    flag goes down."""
    resync_taken_id: str = ""
    """The configuration server's resync request that was taken (one resync per request)."""

    # -- plans, bookmarks, disks
    inflight: list[dict] = field(default_factory=list)
    """The plan of every batch sent but not acknowledged, in seq order: a restart rebuilds and
    resends them with the same seqs before anything new."""
    acked_writeless: list[dict] = field(default_factory=list)
    """The plans of the acknowledged batches that carried no writes (an idle item's ticks, a
    lone bookmark) since the last one that did, newest last (at most ``WRITELESS_KEPT``): if
    the process server loses them with its cache, they are sent again, not resynchronized."""
    bookmarks: list[dict] = field(default_factory=list)
    """Bookmarks queued and not yet acknowledged (a restart still places them)."""
    bookmark_ids_seen: list[str] = field(default_factory=list)
    """The newest bookmark ids taken (one asked for twice is placed once)."""
    disks_due: dict[str, int] = field(default_factory=dict)
    """Disk sizes to announce (0: the disk left the item) before anything else is sent."""
    shape_changed: bool = False
    """A disk changed size once: a full resync announces every size again."""
    last_ack_at: float = 0.0
    """When the last acknowledgement was taken (seconds since the epoch)."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ItemState:
        if not isinstance(raw, dict):
            raise StateError(f"the saved item state is {type(raw).__name__}, not an object")
        missing = [name for name in IDENTITY if name not in raw]
        if missing:
            raise StateError(f"the saved item state lacks {', '.join(missing)}")
        unknown = sorted(set(raw) - FIELD_NAMES)
        if unknown:
            log.info("item %s: dropping unknown saved state keys %s", raw.get("item_id"), ", ".join(unknown))
        return cls(**{k: v for k, v in raw.items() if k in FIELD_NAMES})

    @classmethod
    def from_json(cls, payload: bytes | None) -> ItemState | None:
        """The state saved as ``payload`` (None for an item not started yet)."""
        if not payload:
            return None
        raw = json.loads(payload)
        return cls.from_dict(raw) if raw else None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELD_ORDER}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    def update(self, **changes: Any) -> None:
        """Set several fields at once (a name that is not a field is an error)."""
        for name, value in changes.items():
            if name not in FIELD_NAMES:
                raise AttributeError(f"ItemState has no field {name!r}")
            setattr(self, name, value)


FIELD_ORDER = tuple(f.name for f in fields(ItemState))
FIELD_NAMES = frozenset(FIELD_ORDER)
IDENTITY = ("item_id", "phase", "next_seq", "acked_seq", "capacity", "block_bytes")


def load_item_state(state_dir: str, item_id: uuid.UUID | str) -> ItemState | None:
    """The saved replication state of an item (None before it started; for tools and tests)."""
    path = os.path.join(os.path.abspath(state_dir), "items", str(uuid.UUID(str(item_id))), "state.slots")
    return ItemState.from_json(SlotFile(path).read())
