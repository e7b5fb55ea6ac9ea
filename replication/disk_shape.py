"""Disks that change shape on a protected machine: the vault's side.

The agent announces a disk that grew, was added or left in the replication stream itself
(``mobility/agent.py``, module docstring, 4.), and apply grows, adds or retires the replica
disk at that very point of the stream (``replication/dataplane/apply.py``). The vault keeps
the item's replica disks in step with the machine's disks as discovery (or an agent's
registration) reports them:

- a disk added to a protected machine becomes a new replica disk (the next index, never a
  removed disk's), so the agent's assignment carries it and the agent gives it its initial
  copy while the other disks go on replicating;
- a disk that grew is an event (the agent grows the replica itself, at the right point of
  the stream; the replica disk's size in the database follows apply);
- a disk that appears smaller is an alert, and the item needs a resynchronization (vSphere
  never shrinks a disk: what the replica holds past the new end cannot be trusted to mean
  anything);
- a disk removed from the machine is an event and an alert; its replica disk is marked
  removed and leaves the assignment (the agent announces the end of its stream), and its
  replica data stays for the recovery points that have it.
"""
from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from core.text import size_text
from replication.choices import ProtectionState as P
from replication.models import MobilityAgent, ProtectedItem, ReplicaDisk
from replication.push_install import push_disks_update
from replication.services import protected_item_mark_resync_required
from vault.choices import MachineSource, Severity, VCenterKind
from vault.connectors.simulated import disk_file, journal_path
from vault.services import alert_raise, event_record

logger = logging.getLogger(__name__)

# An item whose disks follow the machine's: replicating, or about to be resynchronized.
SHAPE_STATES = frozenset({P.INITIAL_REPLICATION, P.PROTECTED, P.RESYNC_REQUIRED, P.RESYNCING})


def machine_disks_changed(*, changes: list[dict]) -> None:
    """Discovery saw disks change (``vault.signals.machine_disks_changed``): bring the
    protected items of those machines in step."""
    by_machine: dict = {}
    for change in changes:
        by_machine.setdefault(change["machine_id"], []).append(change)
    items = ProtectedItem.objects.filter(machine_id__in=list(by_machine), protection_state__in=SHAPE_STATES)
    for item in items:
        protected_item_disks_sync(item=item, changes=by_machine[item.machine_id])


def _source_paths(item: ProtectedItem, key: int, backing_file: str) -> tuple[str, str] | None:
    """Where the agent reads the disk and its write journal, if known."""
    machine = item.machine
    vcenter = machine.vcenter
    if vcenter is not None and vcenter.kind == VCenterKind.SIMULATED:
        return disk_file(vcenter.host, machine.instance_uuid, key), journal_path(vcenter.host, machine.instance_uuid, key)
    if machine.source == MachineSource.AGENT:
        return backing_file, ""
    agent = MobilityAgent.objects.filter(machine=machine).first()
    path = next((d.get("path") for d in (agent.disks if agent else []) if int(d.get("key", -1)) == key), None)
    return (path, "") if path else None


def protected_item_disks_sync(*, item: ProtectedItem, changes: list[dict] = ()) -> dict:
    """Bring the item's replica disks in step with its machine's disks (module docstring).
    ``changes`` are the disk changes discovery saw (for the resize events and alerts).
    Idempotent; returns what it did."""
    done = {"added": [], "removed": [], "grown": [], "shrunk": []}
    with transaction.atomic():
        # the item's row lock serializes two syncs of the same item (discovery and an agent)
        item = (ProtectedItem.objects.select_for_update(of=("self",))
                .select_related("vault", "machine", "machine__vcenter").get(pk=item.pk))
        if item.protection_state not in SHAPE_STATES:
            return done
        machine = item.machine
        disks = {d.key: d for d in machine.disks.all()}
        replicas = list(item.replica_disks.all())
        active = {r.source_disk_key: r for r in replicas if r.removed_at is None}
        next_index = max((r.index for r in replicas), default=-1) + 1
        pushed_disks_listed = False
        for key, disk in sorted(disks.items()):
            if key in active:
                continue
            paths = _source_paths(item, key, disk.backing_file)
            if paths is None:
                event_record(vault=item.vault, kind="disk_added", severity=Severity.WARNING, protected_item=item,
                             message=f"{disk.label or f'Disk {key}'} was added to {machine.name}, but its mobility "
                                     "agent has not reported where it reads it: register the agent again with "
                                     f"every disk (--disk {key}=<device path>) so that it is replicated.")
                continue
            replica = ReplicaDisk(item=item, index=next_index, source_disk_key=key, label=disk.label,
                                  capacity_bytes=disk.capacity_bytes, storage_name=f"{item.pk}-disk{next_index}",
                                  source_path=paths[0], journal_dir=paths[1] or "")
            replica.full_clean(exclude=["item"])
            if not pushed_disks_listed:
                # The pushed agent reads only the disks its credentials list: list this
                # one before the assignment can name it (replication/push_install.py).
                pushed_disks_listed = push_disks_update(machine=machine)
            replica.save()
            next_index += 1
            done["added"].append(replica.index)
            event_record(vault=item.vault, kind="disk_added", protected_item=item,
                         message=f"{disk.label or f'Disk {key}'} ({size_text(disk.capacity_bytes)}) was added to "
                                 f"{machine.name}: it is replicated as disk {replica.index} after its initial copy; "
                                 "the other disks go on replicating.")
        now = timezone.now()
        for key, replica in sorted(active.items()):
            if key in disks:
                continue
            ReplicaDisk.objects.filter(pk=replica.pk).update(removed_at=now)
            done["removed"].append(replica.index)
            message = (f"{replica.label or f'Disk {key}'} was removed from {machine.name}: its replication stopped. "
                       "Recovery points taken before keep it; newer ones do not have it.")
            # the alert's own event is the event
            alert_raise(vault=item.vault, key=f"disk_removed:{item.pk}:{replica.index}", kind="disk_removed",
                        message=message, severity=Severity.WARNING, protected_item=item)
    for change in changes:
        old, new = change.get("old"), change.get("new")
        if old is None or new is None or old == new or change["key"] not in disks:
            continue
        label = disks[change["key"]].label or f"Disk {change['key']}"
        if new > old:
            done["grown"].append(change["key"])
            event_record(vault=item.vault, kind="disk_grown", protected_item=item,
                         message=f"{label} of {machine.name} grew from {size_text(old)} to {size_text(new)}: the "
                                 "replica disk grows with it; recovery points taken before keep the old size.")
        else:
            done["shrunk"].append(change["key"])
            protected_item_disk_shrunk(item=item, label=label, old=old, new=new)
    return done


def protected_item_disk_shrunk(*, item: ProtectedItem, label: str, old: int, new: int) -> None:
    """A disk that appears smaller (vSphere disks only grow): alert, and resynchronize."""
    message = (f"{label} of {item.machine.name} appears smaller than before ({size_text(new)}, was "
               f"{size_text(old)}); vSphere disks only grow, so the replica is compared with the source again "
               "(resynchronization required).")
    alert_raise(vault=item.vault, key=f"disk_shrunk:{item.pk}:{label}", kind="disk_shrunk", message=message,
                severity=Severity.CRITICAL, protected_item=item)
    protected_item_mark_resync_required(item=item, reason=message)
