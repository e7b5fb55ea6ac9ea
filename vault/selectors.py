"""Selectors of the vault: functions that read. Counts are aggregated, never per row."""
from __future__ import annotations

from django.db.models import Count

from core.choices import JobState
from core.models import Job
from replication.models import ProtectedItem
from vault.choices import AlertState, Health
from vault.models import Alert, Vault


def vault_overview(*, vault: Vault) -> dict:
    items = ProtectedItem.objects.filter(vault=vault)
    by_health = {row["health"]: row["n"] for row in items.values("health").annotate(n=Count("id"))}
    by_state = {row["protection_state"]: row["n"] for row in items.values("protection_state").annotate(n=Count("id"))}
    return {
        "item_count": sum(by_health.values()),
        "by_health": [(h.label, h.value, by_health.get(h.value, 0)) for h in Health],
        "by_state": sorted(by_state.items()),
        "worst_rpo": list(
            items.filter(rpo_seconds__isnull=False).select_related("policy").order_by("-rpo_seconds")[:5]
        ),
        "open_alerts": list(
            Alert.objects.filter(vault=vault, state=AlertState.ACTIVE).select_related("protected_item").order_by("-raised_at")[:10]
        ),
        "open_alert_count": Alert.objects.filter(vault=vault, state=AlertState.ACTIVE, acknowledged=False).count(),
        "running_jobs": list(Job.objects.filter(vault=vault, state__in=JobState.ACTIVE).order_by("-created_at")[:10]),
        "recent_jobs": list(Job.objects.filter(vault=vault).order_by("-created_at")[:10]),
        "process_servers": list(vault.process_servers.all()),
    }
