"""Selectors of replication: functions that read."""
from __future__ import annotations

from datetime import timedelta

from django.db.models import Case, Count, IntegerField, Value, When
from django.utils import timezone

from core.choices import JobState, JobType
from core.models import Job
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem, RecoveryPoint
from vault.choices import Site
from vault.models import ProcessServer


def item_actions(*, item: ProtectedItem) -> list[tuple[str, str, str]]:
    """(action, label, confirmation) the item's state allows, for the portal's buttons."""
    actions = []
    if item.protection_state == P.RESYNC_REQUIRED:
        actions.append(("resync", "Resynchronize now", ""))
    elif item.protection_state == P.PROTECTED:
        actions.append(("resync", "Resynchronize", "Compare every block of the replica with the source and send "
                        "what differs? Replication goes on meanwhile."))
    if item.protection_state == P.ENABLE_FAILED:
        actions.append(("retry", "Retry enabling replication", ""))
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        pass  # a failback's returning replication ends with the failback, never by itself
    elif item.protection_state not in (P.DISABLING, P.FAILOVER_IN_PROGRESS, P.FAILED_OVER, P.REPROTECTING):
        actions.append(("disable", "Disable replication", "Disable replication and delete this item's replica disks and recovery points?"))
    elif item.protection_state == P.DISABLING and not _job_active(item, JobType.DISABLE_REPLICATION):
        # The disable failed (or its worker died): its replica data may be half removed.
        actions.append(("disable", "Disable again", "Remove this item and what is left of its replica data?"))
    return actions


def _job_active(item: ProtectedItem, job_type: str) -> bool:
    return Job.objects.filter(type=job_type, target_type="protected_item", target_id=str(item.pk),
                              state__in=JobState.ACTIVE).exists()


def item_rpo_history(*, item: ProtectedItem, hours: int = 6, now=None) -> list[dict]:
    """RPO over time, derived from the recovery points: just before each point the RPO was
    the gap since the previous one; right after it, the point's own lag behind its cut."""
    now = now or timezone.now()
    times = list(
        RecoveryPoint.objects.filter(item=item, time__gte=now - timedelta(hours=hours))
        .order_by("time").values_list("time", "created_at")
    )
    series = []
    prev = None
    for source_time, cut_at in times:
        if prev is not None:
            series.append({"t": cut_at.isoformat(), "rpo": round((cut_at - prev).total_seconds(), 1)})
        series.append({"t": cut_at.isoformat(), "rpo": round(max(0.0, (cut_at - source_time).total_seconds()), 1)})
        prev = source_time
    if prev is not None:
        series.append({"t": now.isoformat(), "rpo": round((now - prev).total_seconds(), 1)})
    return series


def process_server_least_loaded(*, vault, site: str = Site.PRIMARY) -> ProcessServer | None:
    """The process server an item goes to when the admin names none: of the vault's servers
    at ``site``, one that has reported (an agent can pin its certificate) before one that
    never has, then the one serving the fewest protected items (ties by name). Enabling
    machines one after another so spreads them evenly over the process servers."""
    never_reported = Case(When(thumbprint="", then=Value(1)), default=Value(0), output_field=IntegerField())
    return (ProcessServer.objects.filter(vault=vault, site=site)
            .annotate(never_reported=never_reported, items=Count("protected_items"))
            .order_by("never_reported", "items", "name").first())


def items_switching_process_server(*, item_ids) -> dict[str, int]:
    """Items of ``item_ids`` with a "Switch process server" job under way: item id -> the
    process server they move to. Until the item is on it, its agent is told nothing of the
    item (the job drains the old server first: replication/jobs.py). One query."""
    jobs = Job.objects.filter(type=JobType.CHANGE_PROCESS_SERVER, target_type="protected_item",
                              target_id__in=[str(i) for i in item_ids], state__in=JobState.ACTIVE)
    return {target: int(params["process_server"]) for target, params in jobs.values_list("target_id", "params")}
