"""Replication groups (multi-VM consistency): protected items that get shared recovery points.

A shared point is taken under a barrier (``group_point_take``): the configuration server
holds the completion of new writes on every member at once (each disk's write filter; on
the simulated site ``SimulatedSite.hold_group_writes``), notes every member's journal
positions, queues one bookmark per member at its positions carrying the group point's id,
and releases. The agents place the bookmarks in their streams like any other; apply cuts
each member's point there (``label["group"]``) and ``points_mirror`` ties the point to the
group point. A group point is complete only when every member has its point. A member not
held within ``HOLD_LIMIT_SECONDS`` (a hung writer or agent) abandons the round: nothing is
bookmarked and the round never makes a complete point.

Why under a barrier: a write on B that refers to a write on A was issued after A's write
completed. If B's write is inside B's cut it completed before B was held; had A's write
completed after A was held, it could only have completed after the release, which comes
after every member was held: a contradiction. So A's write is inside A's cut.
"""
from __future__ import annotations

import uuid
from datetime import timedelta

from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from core.exceptions import LifeboatError, ValidationFailed
from replication.choices import GroupPointState, ProtectionState
from replication.models import GroupRecoveryPoint, ProtectedItem, ReplicationGroup
from vault.connectors import ConnectorError
from vault.discovery import connector_for
from vault.models import Vault

HOLD_LIMIT_SECONDS = 0.5  # the longest a member's writes wait for the others to be held


def _members_check(*, vault: Vault, items: list[ProtectedItem], group: ReplicationGroup | None) -> None:
    if not items:
        raise ValidationFailed("A replication group needs at least one protected item.")
    for item in items:
        if item.vault_id != vault.pk:
            raise ValidationFailed(f"{item.name} belongs to another vault.")
        if item.replication_group_id is not None and (group is None or item.replication_group_id != group.pk):
            raise ValidationFailed(f"{item.name} is already in the replication group '{item.replication_group}'; "
                                   "an item is in one group at most.")


def replication_group_create(*, vault: Vault, name: str, items: list[ProtectedItem],
                             point_frequency_seconds: int = 300) -> ReplicationGroup:
    name = name.strip()
    if not name:
        raise ValidationFailed("A replication group needs a name.")
    if ReplicationGroup.objects.filter(vault=vault, name=name).exists():
        raise ValidationFailed(f"The vault already has a replication group named '{name}'.")
    _members_check(vault=vault, items=items, group=None)
    with transaction.atomic():
        group = ReplicationGroup.objects.create(vault=vault, name=name, point_frequency_seconds=point_frequency_seconds)
        ProtectedItem.objects.filter(pk__in=[i.pk for i in items]).update(replication_group=group)
    return group


def replication_group_update(*, group: ReplicationGroup, name: str | None = None, items: list[ProtectedItem] | None = None,
                             point_frequency_seconds: int | None = None) -> ReplicationGroup:
    if name is not None:
        name = name.strip()
        if not name:
            raise ValidationFailed("A replication group needs a name.")
        if ReplicationGroup.objects.filter(vault=group.vault_id, name=name).exclude(pk=group.pk).exists():
            raise ValidationFailed(f"The vault already has a replication group named '{name}'.")
    if items is not None:
        _members_check(vault=group.vault, items=items, group=group)
    with transaction.atomic():
        if name is not None:
            group.name = name
        if point_frequency_seconds is not None:
            group.point_frequency_seconds = point_frequency_seconds
        group.save()
        if items is not None:
            keep = [i.pk for i in items]
            ProtectedItem.objects.filter(replication_group=group).exclude(pk__in=keep).update(replication_group=None)
            ProtectedItem.objects.filter(pk__in=keep).update(replication_group=group)
    return group


def replication_group_delete(*, group: ReplicationGroup) -> None:
    """The members stay protected; their points stay, no longer shared."""
    group.delete()


def group_point_complete(point: GroupRecoveryPoint) -> bool:
    if point.state != GroupPointState.RELEASED:
        return False
    have = set(map(str, point.item_points.values_list("item_id", flat=True)))
    return bool(point.members) and have >= set(point.members)


def group_point_latest_complete(*, group: ReplicationGroup) -> GroupRecoveryPoint | None:
    """The newest complete group point (the one a group's failover uses)."""
    for point in (GroupRecoveryPoint.objects.filter(group=group, state=GroupPointState.RELEASED)
                  .annotate(have=Count("item_points")).filter(have__gt=0).order_by("-created_at")):
        if group_point_complete(point):
            return point
    return None


def group_point_take(*, group: ReplicationGroup, hold_limit: float = HOLD_LIMIT_SECONDS) -> GroupRecoveryPoint:
    """One round of the barrier (see the module's description). Returns the group point:
    RELEASED (its members' points follow as their streams are applied) or ABANDONED."""
    members = list(group.members.select_related("machine", "machine__vcenter").prefetch_related("replica_disks")
                   .order_by("pk"))
    point = GroupRecoveryPoint.objects.create(group=group, members=[str(m.pk) for m in members])
    ReplicationGroup.objects.filter(pk=group.pk).update(last_point_requested_at=timezone.now())
    not_protected = [m.name for m in members if m.protection_state != ProtectionState.PROTECTED]
    if not members or not_protected:
        return _abandon(point, "no members" if not members else f"not protected: {', '.join(not_protected)}")
    by_vcenter: dict = {}
    for m in members:
        if m.machine.vcenter is None:
            return _abandon(point, f"{m.name}: its writes cannot be held from the configuration server (an agent "
                                   "installed by hand takes part in no group barrier yet)")
        by_vcenter.setdefault(m.machine.vcenter_id, (m.machine.vcenter, []))[1].append(m)
    connectors = []
    holds = []
    try:
        positions: dict[str, dict[int, int]] = {}
        try:
            for vcenter, items in by_vcenter.values():
                connector = connector_for(vcenter)
                connectors.append(connector)
                if not hasattr(connector, "hold_group_writes"):
                    return _abandon(point, f"{vcenter.name}: its VMs' writes cannot be held from the configuration "
                                           "server (only the simulated site's write filters are within its reach)")
                connector.connect()
                hold, by_vm = connector.hold_group_writes([i.machine.instance_uuid for i in items], timeout=hold_limit)
                holds.append(hold)
                positions.update(by_vm)
        except (ConnectorError, LifeboatError) as exc:
            return _abandon(point, str(exc))
        # Every member is held: bookmark each one at its positions (the guest's hook, at once,
        # and the vault's queue, for an agent that was not running), then release.
        bookmark_id = uuid.uuid4().hex
        label = f"group {group.name} {point.created_at:%Y-%m-%d %H:%M:%S}"
        try:
            for connector, (_vcenter, items) in zip(connectors, by_vcenter.values()):
                connector.place_group_bookmarks([i.machine.instance_uuid for i in items],
                                                {"id": bookmark_id, "label": label, "group": str(point.pk)})
        except (ConnectorError, OSError) as exc:
            return _abandon(point, str(exc))
        with transaction.atomic():
            for m in ProtectedItem.objects.select_for_update().filter(pk__in=[m.pk for m in members]).order_by("pk"):
                index_of = {d.source_disk_key: d.index for d in m.replica_disks.all() if d.removed_at is None}
                by_key = positions[m.machine.instance_uuid]
                bookmark = {"id": bookmark_id, "label": label, "group": str(point.pk),
                            "positions": {str(index_of[k]): seq for k, seq in by_key.items() if k in index_of},
                            "requested_at": timezone.now().isoformat()}
                ProtectedItem.objects.filter(pk=m.pk).update(pending_bookmarks=[*m.pending_bookmarks[-9:], bookmark])
            GroupRecoveryPoint.objects.filter(pk=point.pk).update(state=GroupPointState.RELEASED)
    finally:
        for hold in holds:
            hold.release()
        for connector in connectors:
            connector.close()
    point.refresh_from_db()
    return point


def _abandon(point: GroupRecoveryPoint, reason: str) -> GroupRecoveryPoint:
    GroupRecoveryPoint.objects.filter(pk=point.pk).update(state=GroupPointState.ABANDONED, reason=reason[:2000])
    point.refresh_from_db()
    return point


def group_points_due(now=None) -> int:
    """Take a shared point of every group whose frequency has passed (the beat calls it)."""
    now = now or timezone.now()
    taken = 0
    for group in ReplicationGroup.objects.filter(point_frequency_seconds__gt=0):
        last = group.last_point_requested_at
        if last is not None and now - last < timedelta(seconds=group.point_frequency_seconds):
            continue
        group_point_take(group=group)
        taken += 1
    return taken
