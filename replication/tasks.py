from __future__ import annotations

import logging

from celery import shared_task
from django.utils import timezone

from replication.choices import ProtectionState as P
from replication.engine import item_apply
from replication.groups import group_points_due
from replication.models import ProtectedItem
from replication.monitoring import items_monitor, process_servers_monitor
from replication.scheduling import items_app_consistent_due, items_resync_in_offhours
from vault.notifications import alerts_notify


logger = logging.getLogger(__name__)


@shared_task(name="replication.apply_item", ignore_result=True, acks_late=True)
def apply_item(item_id: str) -> None:
    """Apply an item's pending logs. Idempotent (replays are harmless), hence acks_late."""
    summary = item_apply(item_id=item_id)
    if summary and summary.get("more"):
        apply_item.apply_async(args=[item_id])


@shared_task(name="replication.apply_sweep", ignore_result=True)
def apply_sweep() -> int:
    """Enqueue an apply pass for every item whose data flows (the beat runs this every few seconds)."""
    now = timezone.now()
    ids = list(
        ProtectedItem.objects.filter(protection_state__in=P.REPLICATING)
        .exclude(apply_lease_until__gt=now)
        .values_list("pk", flat=True)
    )
    for pk in ids:
        apply_item.apply_async(args=[str(pk)])
    return len(ids)


@shared_task(name="replication.monitor", ignore_result=True)
def monitor() -> dict:
    """RPO and health of every item and process server, then alert e-mail that is due."""
    result = {"items": items_monitor(), "process_servers": process_servers_monitor()}
    result["mail"] = alerts_notify()
    return result


@shared_task(name="replication.offhours_resync", ignore_result=True)
def offhours_resync() -> int:
    return items_resync_in_offhours()


@shared_task(name="replication.app_consistent_sweep", ignore_result=True)
def app_consistent_sweep() -> int:
    return items_app_consistent_due()


@shared_task(name="replication.group_points_sweep", ignore_result=True)
def group_points_sweep() -> int:
    return group_points_due()
