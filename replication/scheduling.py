"""Scheduled replication work: app-consistent snapshots and off-hours resynchronization.

A resync that fails puts the item back in RESYNC_REQUIRED with its error
(``resync_failure_recorded``, the resync job's failure hook) and a time before which the
off-hours sweep does not try again: 5 minutes after the first failure, doubling with each
failure in a row, at most 4 hours. "Resynchronize now" does not wait for it; a resync that
succeeds clears the count."""
from __future__ import annotations

import logging
import uuid
import zoneinfo
from datetime import datetime, time as dtime, timedelta

from django.db.models import F, Max, Q
from django.utils import timezone

from core.exceptions import LifeboatError
from core.transitions import transition
from replication.choices import ProtectionState as P
from replication.choices import RecoveryPointType
from replication.models import ProtectedItem
from replication.services import protected_item_resync
from replication.transitions import PROTECTION
from vault.choices import Severity
from vault.connectors import ConnectorError
from vault.discovery import connector_for
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


RESYNC_RETRY_FIRST = timedelta(minutes=5)
RESYNC_RETRY_MAX = timedelta(hours=4)


def resync_retry_delay(*, attempts: int) -> timedelta:
    """How long after its ``attempts``-th failure in a row a resync is tried again."""
    return min(RESYNC_RETRY_FIRST * 2 ** max(attempts - 1, 0), RESYNC_RETRY_MAX)


def resync_failure_recorded(*, item_id, error: str, now=None) -> bool:
    """A resynchronization failed: the item goes back to RESYNC_REQUIRED with the error, one
    more failure is counted and the off-hours sweep waits out the backoff before it tries
    again. Only an item still RESYNCING is changed (compare-and-set); True if it was."""
    now = now or timezone.now()
    item = ProtectedItem.objects.filter(pk=item_id).select_related("vault").first()
    if item is None:
        return False
    attempts = item.resync_attempts + 1
    retry_at = now + resync_retry_delay(attempts=attempts)
    local = retry_at.astimezone(zoneinfo.ZoneInfo(item.vault.off_hours_time_zone))
    message = (f"Resynchronization failed ({attempts} in a row): {error} It is retried by itself from "
               f"{local:%Y-%m-%d %H:%M %Z} in the vault's off-hours window, or at once with Resynchronize now.")
    updated = transition(
        PROTECTION, model=ProtectedItem, pk=item_id, to_state=P.RESYNC_REQUIRED, operation="record the failed resync of",
        from_states={P.RESYNCING}, quiet=True, last_error=message[:2000], resync_attempts=F("resync_attempts") + 1,
        resync_retry_at=retry_at,
    )
    if updated:
        event_record(vault=item.vault, kind="resync_failed", message=f"{item.name}: {message}",
                     severity=Severity.WARNING, protected_item=item)
    return bool(updated)


def items_resync_in_offhours(*, now=None) -> int:
    """Start the resynchronization of every item that needs one, in its vault's off-hours,
    once the backoff after a failed resync has passed."""
    now = now or timezone.now()
    started = 0
    # A resync that succeeded ends the run of failures.
    ProtectedItem.objects.filter(protection_state=P.PROTECTED, resync_attempts__gt=0).update(
        resync_attempts=0, resync_retry_at=None)
    open_vaults = {
        v.pk for v in Vault.objects.all()
        if in_window(now=now, start=v.off_hours_start, end=v.off_hours_end, tz=v.off_hours_time_zone)
    }
    due = Q(resync_retry_at__isnull=True) | Q(resync_retry_at__lte=now)
    for item in ProtectedItem.objects.filter(due, protection_state=P.RESYNC_REQUIRED, vault__in=open_vaults).select_related("vault"):
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
