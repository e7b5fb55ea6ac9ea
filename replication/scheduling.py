"""Scheduled replication work: app-consistent snapshots and off-hours resynchronization."""
from __future__ import annotations

import logging
import uuid
import zoneinfo
from datetime import datetime, time as dtime, timedelta

from django.db.models import Max
from django.utils import timezone

from core.exceptions import LifeboatError
from replication.choices import ProtectionState as P
from replication.choices import RecoveryPointType
from replication.models import ProtectedItem
from vault.choices import Severity
from vault.models import Vault
from vault.services import event_record

logger = logging.getLogger(__name__)


def in_window(*, now: datetime, start: dtime, end: dtime, tz: str) -> bool:
    """Is ``now`` inside the daily window [start, end) in time zone ``tz``? Windows may cross midnight."""
    local = now.astimezone(zoneinfo.ZoneInfo(tz)).time()
    if start == end:
        return True
    if start < end:
        return start <= local < end
    return local >= start or local < end


def items_resync_in_offhours(*, now=None) -> int:
    """Start the resynchronization of every item that needs one, in its vault's off-hours."""
    from replication.services import protected_item_resync

    now = now or timezone.now()
    started = 0
    open_vaults = {
        v.pk for v in Vault.objects.all()
        if in_window(now=now, start=v.off_hours_start, end=v.off_hours_end, tz=v.off_hours_time_zone)
    }
    for item in ProtectedItem.objects.filter(protection_state=P.RESYNC_REQUIRED, vault__in=open_vaults).select_related("vault"):
        try:
            protected_item_resync(item=item)
            started += 1
        except LifeboatError as exc:
            logger.info("off-hours resync of %s not started: %s", item.pk, exc)
    return started


def items_app_consistent_due(*, now=None) -> int:
    """Ask for an app-consistent snapshot of every protected item whose frequency has passed."""
    now = now or timezone.now()
    items = (
        ProtectedItem.objects.filter(protection_state=P.PROTECTED, policy__app_consistent_frequency_hours__gt=0)
        .select_related("policy", "vault", "machine", "machine__vcenter")
        .annotate(last_app=Max("recovery_points__time", filter=models_q_app()))
    )
    asked = 0
    for item in items:
        every = timedelta(hours=item.policy.app_consistent_frequency_hours)
        last = max([t for t in (item.last_app, item.last_app_consistent_request_at) if t is not None], default=item.created_at)
        if now - last < every:
            continue
        try:
            protected_item_app_consistent_snapshot(item=item, now=now)
            asked += 1
        except LifeboatError as exc:
            event_record(vault=item.vault, kind="app_consistent_failed", message=f"App-consistent snapshot of {item.name} failed: {exc.message}", severity=Severity.WARNING, protected_item=item)
    return asked


def models_q_app():
    from django.db.models import Q

    return Q(recovery_points__type=RecoveryPointType.APP_CONSISTENT)


def protected_item_app_consistent_snapshot(*, item: ProtectedItem, now=None) -> dict:
    """Quiesce the VM (vCenter CreateSnapshot with quiesce) and remove the snapshot; the
    point cut at the quiesced moment is app-consistent.

    The moment is caught inside the guest: while vCenter holds the VM's writes, VMware Tools
    runs the guest's freeze scripts, and the mobility agent's freeze hook (``python -m
    mobility freeze``) bookmarks the replication stream right there. A bookmark asked for
    after the snapshot would land after writes made once the VM thawed, so the vault queues
    one itself only where it knows the journal positions of the quiesced moment (the
    simulated site reports them; it also runs the guest's hook, with this bookmark's id);
    the agent drops any bookmark the stream has already gone past."""
    from vault.connectors import ConnectorError
    from vault.discovery import connector_for

    now = now or timezone.now()
    machine = item.machine
    bookmark = {"id": uuid.uuid4().hex, "label": f"app-consistent {now:%Y-%m-%d %H:%M:%S}", "requested_at": now.isoformat()}
    queue = machine.vcenter is None  # an agent-managed machine: the agent bookmarks when asked
    if machine.vcenter is not None:
        connector = connector_for(machine.vcenter)
        try:
            connector.connect()
            positions_fn = getattr(connector, "snapshot_journal_seq", None)
            name = f"lifeboat-{bookmark['id'][:12]}"
            if positions_fn is not None:
                snap = connector.create_quiesced_snapshot(machine.instance_uuid, name, guest_bookmark=bookmark)
                by_key = positions_fn(machine.instance_uuid, snap.id)
                index_of = {d.source_disk_key: d.index for d in item.replica_disks.all()}
                bookmark["positions"] = {str(index_of[k]): seq for k, seq in by_key.items() if k in index_of}
                queue = True
            else:
                snap = connector.create_quiesced_snapshot(machine.instance_uuid, name)
                bookmark["via"] = "guest freeze hook"
            connector.remove_snapshot(machine.instance_uuid, snap.id)
        except ConnectorError as exc:
            raise LifeboatError(str(exc)) from None
        finally:
            connector.close()
    if queue:
        ProtectedItem.objects.filter(pk=item.pk).update(
            pending_bookmarks=[*item.pending_bookmarks[-9:], bookmark], last_app_consistent_request_at=now
        )
    else:
        ProtectedItem.objects.filter(pk=item.pk).update(last_app_consistent_request_at=now)
    return bookmark
