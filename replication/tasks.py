from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from replication.choices import ProtectionState as P
from replication.engine import apply_again_take, item_apply, items_to_wake
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
    if summary is None:
        return  # another worker's pass holds the item; it sees any wake-up when it ends
    if apply_again_take(item_id) or summary.get("more"):
        apply_item.apply_async(args=[item_id])


# An apply sweep sends the passes of several items in one message: at 10,000 items, one
# message per item took longer to send than the sweep's 5-s period. Chunks stay small
# enough for the apply workers to share the items: a sweep sends at least APPLY_SPREAD
# messages when it has that many items, and never more than APPLY_CHUNK items in one.
APPLY_CHUNK = 50
APPLY_SPREAD = 8


def apply_chunks(ids: list[str], *, spread: int = APPLY_SPREAD, most: int = APPLY_CHUNK) -> list[list[str]]:
    """The sweep's item ids cut into the messages it sends."""
    size = max(1, min(most, len(ids) // spread))
    return [ids[at:at + size] for at in range(0, len(ids), size)]


@shared_task(name="replication.apply_items", ignore_result=True, acks_late=True)
def apply_items(item_ids: list[str]) -> None:
    """An apply pass for each item of a sweep's chunk, one after the other. Idempotent like
    ``apply_item``, hence acks_late; an item whose pass fails is logged and the others still
    get theirs (the next sweep tries it again)."""
    for item_id in item_ids:
        try:
            apply_item(item_id)
        except Exception:  # noqa: BLE001 - one item's failure must not cost the rest of the chunk its pass
            logger.exception("The apply pass of item %s failed; the next sweep tries it again.", item_id)


def _apply_send(ids: list[str]) -> None:
    """Send apply passes for these items, in chunks (``apply_chunks``), over one broker connection."""
    if ids:
        with apply_items.app.producer_or_acquire() as producer:
            for chunk in apply_chunks(ids):
                apply_items.apply_async(args=[chunk], producer=producer)


def apply_wake(item_ids, *, process_server_id=None) -> int:
    """Start an apply pass now for each of these items (a process server has just put logs
    of theirs into storage), unless one is running (it runs again when it ends: see
    replication/engine.py). Returns the number of items sent a pass."""
    ids = items_to_wake(item_ids, process_server_id=process_server_id)
    _apply_send(ids)
    return len(ids)


# The sweep is the fallback of the passes uploads start (``apply_wake``): an item whose last
# pass ended this recently is left to them (a replicating item's agent sends at least a tick
# batch every 5 s, and each upload starts a pass).
SWEEP_SKIPS_APPLIED_WITHIN = timedelta(seconds=3)


@shared_task(name="replication.apply_sweep", ignore_result=True)
def apply_sweep() -> int:
    """Enqueue an apply pass for every item whose data flows (the beat runs this every few
    seconds) and that had none in the last ``SWEEP_SKIPS_APPLIED_WITHIN``, in chunks
    (``apply_chunks``) sent over one broker connection. Returns the number of items."""
    now = timezone.now()
    ids = [str(pk) for pk in
           ProtectedItem.objects.filter(protection_state__in=P.REPLICATING)
           .exclude(apply_lease_until__gt=now)
           .exclude(last_applied_at__gt=now - SWEEP_SKIPS_APPLIED_WITHIN)
           .values_list("pk", flat=True)]
    _apply_send(ids)
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
