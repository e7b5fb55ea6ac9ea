"""What the configuration server assigns an agent: protected items and their disks."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from mobility.errors import AgentError


@dataclass(frozen=True)
class DiskAssignment:
    index: int
    key: str
    path: str
    journal_dir: str | None = None


@dataclass(frozen=True)
class ItemAssignment:
    item_id: uuid.UUID
    item_token: str
    process_server_url: str
    process_server_thumbprint: str
    disks: tuple[DiskAssignment, ...]
    # The configuration server asks for a resynchronization (the item is RESYNCING) ...
    resync: bool = field(default=False, compare=False)
    # ... or for app-consistent bookmarks: [{"id", "label", "positions": {disk index: journal seq}}]
    bookmarks: tuple[dict, ...] = field(default=(), compare=False)
    # Names the request (one per time the item entered RESYNCING): two requests in a row are
    # two resyncs even if this agent never saw the flag down in between.
    resync_id: str = field(default="", compare=False)
    # The replica already holds a copy of the disks (seeded from the original disk on failback,
    # or an existing replica this agent has no state for): an item seen for the first time
    # compares its disks with the replica (a checksum resync) instead of copying them whole.
    # An item with saved state ignores it.
    seeded: bool = field(default=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> "ItemAssignment":
        try:
            disks = tuple(
                DiskAssignment(int(d["index"]), str(d.get("key", d["index"])), str(d["path"]),
                               d.get("journal_dir") or None)
                for d in raw["disks"]
            )
            bookmarks = tuple(dict(b) for b in raw.get("bookmarks") or () if isinstance(b, dict) and b.get("id"))
            item = cls(uuid.UUID(str(raw["item_id"])), str(raw["item_token"]), str(raw["process_server_url"]),
                       str(raw["process_server_thumbprint"]), disks, bool(raw.get("resync", False)), bookmarks,
                       str(raw.get("resync_id") or ""), bool(raw.get("seeded", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise AgentError(f"the assignment of item {raw.get('item_id')!r} is malformed: {e!r}") from None
        if len({d.index for d in disks}) != len(disks):
            raise AgentError(f"the assignment of item {item.item_id} repeats a disk index")
        return item

    def to_dict(self) -> dict:
        return {
            "item_id": str(self.item_id),
            "item_token": self.item_token,
            "process_server_url": self.process_server_url,
            "process_server_thumbprint": self.process_server_thumbprint,
            "resync": self.resync,
            "resync_id": self.resync_id,
            "seeded": self.seeded,
            "bookmarks": list(self.bookmarks),
            "disks": [{"index": d.index, "key": d.key, "path": d.path, "journal_dir": d.journal_dir}
                      for d in self.disks],
        }
