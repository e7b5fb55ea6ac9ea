"""Requests left in an agent's state directory for the running agent to take on its next
pass: a bookmark, a resync, and the guest's freeze hook (bookmarks at the journals'
positions of a quiesced moment). They work from another process (``python -m mobility``)."""
from __future__ import annotations

import os
import secrets
import time
import uuid
from typing import Any

from mobility import filter as journal
from mobility.assignment import ItemAssignment
from mobility.errors import AgentError
from mobility.jsonfile import read_json, write_json


def write_request(state_dir: str, kind: str, item_id: str, label: str = "") -> str:
    """Ask a running agent (another process) for a bookmark or a resync, through its state dir."""
    requests_dir = os.path.join(os.path.abspath(state_dir), "requests")
    os.makedirs(requests_dir, mode=0o700, exist_ok=True)
    item = str(uuid.UUID(item_id))
    if kind == "resync":
        path = os.path.join(requests_dir, f"resync-{item}")
        write_json(path, {"item_id": item})
        return path
    if kind == "bookmark":
        cached = read_json(os.path.join(os.path.abspath(state_dir), "assignment.json"), {"items": []})
        assigned = next((ItemAssignment.from_dict(i) for i in cached.get("items", []) if i.get("item_id") == item),
                        None)
        if assigned is None:  # no cached assignment (yet): the journals' positions are taken later
            assigned = ItemAssignment(uuid.UUID(item), "", "", "", ())
        return write_bookmark_request(requests_dir, assigned, str(uuid.uuid4()), label,
                                       with_positions=bool(assigned.disks))
    raise AgentError(f"unknown request {kind!r}")


def guest_freeze(state_dir: str, *, bookmark_id: str | None = None, label: str = "", group: str | None = None) -> list[str]:
    """The guest's freeze hook: called while the VM's writes are held for a quiesced
    snapshot (VMware Tools runs its freeze scripts then; ``python -m mobility freeze``), it
    bookmarks every assigned item at the journal positions of that very moment. The running
    agent places the bookmarks there, so their points are the quiesced state even though
    the VM writes on once thawed. With ``group`` (a replication group's point id) the writes
    are held at the group's barrier instead and the bookmarks carry the group point. Returns
    the request files written."""
    requests_dir = os.path.join(os.path.abspath(state_dir), "requests")
    os.makedirs(requests_dir, mode=0o700, exist_ok=True)
    cached = read_json(os.path.join(os.path.abspath(state_dir), "assignment.json"), {"items": []})
    bookmark_id = bookmark_id or uuid.uuid4().hex
    label = label or f"quiesced by the guest at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC"
    return [write_bookmark_request(requests_dir, ItemAssignment.from_dict(raw), bookmark_id, label, group=group)
            for raw in cached.get("items", []) if any(d.get("journal_dir") for d in raw.get("disks", []))]


def write_bookmark_request(requests_dir: str, item: ItemAssignment, bookmark_id: str, label: str, *,
                            with_positions: bool = True, group: str | None = None) -> str:
    req: dict[str, Any] = {"item_id": str(item.item_id), "id": bookmark_id, "label": label}
    if group:
        req["group"] = group
    if with_positions:
        req["positions"] = {str(d.index): journal.last_seq(d.journal_dir) for d in item.disks if d.journal_dir}
    path = os.path.join(requests_dir, f"bookmark-{time.time_ns()}-{secrets.token_hex(3)}.json")
    write_json(path, req)
    return path
