"""Monitoring: RPO and health of every item, process-server health, in one pass each.

RPO is now minus the source time of the item's newest recovery point, by the server's
clock. Health is derived from RPO against the policy's threshold, resynchronization needs,
agent silence and errors; each reason is a sentence the portal shows. Problems raise alerts
(and e-mail through ``vault.notifications``); their end resolves them.
"""
from __future__ import annotations

import json

from django.conf import settings
from django.db import connection
from django.db.models import DateTimeField, F, Func, IntegerField, Value
from django.utils import timezone

from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from vault.choices import Health, Severity
from vault.models import Alert, ProcessServer, ReplicationPolicy, Vault
from vault.services import AlertChange, alert_raise, alerts_apply

# ASR's process-server thresholds: (warning, critical).
PS_CPU = (80.0, 95.0)
PS_MEMORY = (80.0, 95.0)
PS_CACHE_FREE_PERCENT = (30.0, 25.0)  # free space below these


def _minutes(seconds: float) -> str:
    """'45 s', '2 min 25 s', '12 min', '180 min'."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 10:
        return f"{minutes} min {sec} s" if sec else f"{minutes} min"
    return f"{minutes} min"


def item_health(item: ProtectedItem | MonitoredItem, *, now) -> tuple[int | None, str, list[str]]:
    """(rpo_seconds, health, reasons) of one item; no queries (policy is selected with it)."""
    reasons: list[tuple[str, str]] = []
    rpo = None
    threshold = item.policy.rpo_threshold_minutes * 60
    if item.last_recovery_point_at is not None:
        rpo = max(0, int((now - item.last_recovery_point_at).total_seconds()))
    replicating = item.protection_state in P.REPLICATING and item.protection_state != P.INITIAL_REPLICATION
    if replicating and rpo is not None and rpo > threshold:
        level = Health.CRITICAL if rpo > 2 * threshold else Health.WARNING
        reasons.append((level, f"RPO {_minutes(rpo)} is above the policy's threshold of {_minutes(threshold)}."))
    if item.protection_state == P.RESYNC_REQUIRED:
        reasons.append((Health.WARNING, "Resynchronization is required: data may have been lost in transit."))
    if item.protection_state == P.ENABLE_FAILED:
        reasons.append((Health.CRITICAL, "Enabling protection failed; retry or disable replication."))
    if item.protection_state in P.REPLICATING:
        silence = settings.LIFEBOAT_HEARTBEAT_TIMEOUT
        last = item.agent_last_heartbeat_at
        if last is None or (now - last).total_seconds() > silence:
            since = "never sent one" if last is None else f"silent for {_minutes((now - last).total_seconds())}"
            if last is not None or (now - item.created_at).total_seconds() > silence:
                reasons.append((Health.CRITICAL, f"The mobility agent has stopped sending heartbeats ({since})."))
    if item.last_error:
        reasons.append((Health.WARNING, item.last_error))
    health = Health.HEALTHY
    if any(level == Health.CRITICAL for level, _ in reasons):
        health = Health.CRITICAL
    elif reasons:
        health = Health.WARNING
    return rpo, health, [text for _, text in reasons]


class SecondsSince(Func):
    """Whole seconds from a timestamp column to ``now``, never negative: the RPO as
    ``item_health`` computes it (``max(0, int(seconds))``), in SQL."""

    output_field = IntegerField()

    def __init__(self, now, column: str) -> None:
        super().__init__(Value(now, output_field=DateTimeField()), F(column))

    def as_postgresql(self, compiler, connection, **extra):
        return self.as_sql(compiler, connection, arg_joiner=" - ",
                           template="GREATEST(0, FLOOR(EXTRACT(EPOCH FROM (%(expressions)s))))::integer", **extra)

    def as_sqlite(self, compiler, connection, **extra):
        # Whole seconds and microseconds apart (SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff"),
        # in integers: julianday's floating point is a second off now and then.
        (now, now_params), (col, col_params) = (compiler.compile(e) for e in self.get_source_expressions())
        micros = (f"((strftime('%%s', {now}) - strftime('%%s', {col})) * 1000000 "
                  f"+ CAST(substr({now}, 21, 6) AS INTEGER) - CAST(substr({col}, 21, 6) AS INTEGER))")
        return f"MAX(0, {micros} / 1000000)", (*now_params, *col_params, *now_params, *col_params)


def items_monitor(*, now=None) -> dict:
    """One pass over every item: RPO and health, then alerts for what changed.

    Every item's RPO moves at every sweep, so it is written for all of them in one UPDATE
    computed by the database (``SecondsSince``), never row by row: at 10,000 items a
    ``bulk_update`` of every RPO took seconds of query building alone. Health and its
    reasons change rarely; only the items whose health changed are written."""
    now = now or timezone.now()
    items = _monitored_items()
    active = _active_alert_keys()
    changed = []
    health_changed = []
    raises: list[AlertChange] = []
    resolves: list[AlertChange] = []
    rpo_moved = rpo_cleared = False
    for item in items:
        rpo, health, reasons = item_health(item, now=now)
        if (rpo, health, reasons) != (item.rpo_seconds, item.health, item.health_reasons):
            changed.append(item)
            if rpo != item.rpo_seconds:
                rpo_moved |= rpo is not None
                rpo_cleared |= rpo is None
            if (health, reasons) != (item.health, item.health_reasons):
                health_changed.append(item)
            item.rpo_seconds, item.health, item.health_reasons = rpo, health, reasons
        _item_alerts(item, active=active, raises=raises, resolves=resolves)
    if rpo_moved:
        ProtectedItem.objects.filter(last_recovery_point_at__isnull=False).update(
            rpo_seconds=SecondsSince(now, "last_recovery_point_at"))
    if rpo_cleared:
        ProtectedItem.objects.filter(last_recovery_point_at__isnull=True, rpo_seconds__isnull=False).update(rpo_seconds=None)
    _health_write(health_changed)
    # Alerts that start or end, all at once: a hundred items losing their process server
    # together cost a few statements, not a few each (vault.services.alerts_apply).
    raised, resolved = alerts_apply(raise_=raises, resolve=resolves, now=now)
    return {"items": len(items), "changed": len(changed), "health_changed": len(health_changed),
            "alerts_raised": raised, "alerts_resolved": resolved}


def _health_write(items: list[MonitoredItem]) -> None:
    """Write the health of these items in one statement. On PostgreSQL the new values go
    in as arrays joined to the rows (``unnest``): Django's ``bulk_update`` builds a CASE
    with a branch per item and field, whose building alone took most of a second for the
    first sweep over 10,000 items (1,700 items whose health changed)."""
    if not items:
        return
    if connection.vendor != "postgresql":
        ProtectedItem.objects.bulk_update([ProtectedItem(pk=i.id, health=i.health, health_reasons=i.health_reasons)
                                           for i in items], ["health", "health_reasons"], batch_size=500)
        return
    table = connection.ops.quote_name(ProtectedItem._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} AS t SET health = v.health, health_reasons = v.reasons "
            "FROM unnest(%s::uuid[], %s::varchar[], %s::jsonb[]) AS v(id, health, reasons) WHERE t.id = v.id",
            [[str(i.pk) for i in items], [str(i.health) for i in items], [json.dumps(i.health_reasons) for i in items]],
        )


# What the sweep reads of an item (``item_health``, ``_item_alerts``): the other columns
# (keys, journals of bookmarks, data path figures) would only cost time to load.
MONITORED_COLUMNS = ("id", "vault_id", "policy_id", "name", "protection_state", "health", "health_reasons",
                     "rpo_seconds", "last_recovery_point_at", "agent_last_heartbeat_at", "created_at", "last_error")


class MonitoredItem:
    """An item as the sweep reads it: its monitored columns, its vault and its policy. A
    plain row, not a model instance: building 10,000 of those (every other field deferred)
    was a third of a sweep."""

    __slots__ = (*MONITORED_COLUMNS, "vault", "policy")

    def __init__(self, row: tuple, vault: Vault, policy: ReplicationPolicy) -> None:
        for name, value in zip(MONITORED_COLUMNS, row, strict=True):
            setattr(self, name, value)
        self.vault, self.policy = vault, policy

    @property
    def pk(self):
        return self.id


def _monitored_items() -> list[MonitoredItem]:
    """Every item with the columns the sweep reads, its vault and policy shared from one
    query each (a vault and a policy per row, joined, would be 20,000 more objects to build
    at 10,000 items). An item whose vault is gone since the first query is being deleted
    with it: it is left out."""
    rows = list(ProtectedItem.objects.order_by().values_list(*MONITORED_COLUMNS))
    vaults = {v.pk: v for v in Vault.objects.all()}
    policies = {p.pk: p for p in ReplicationPolicy.objects.all()}  # a policy in use cannot be deleted (PROTECT)
    return [MonitoredItem(row, vaults[row[1]], policies[row[2]]) for row in rows if row[1] in vaults]


def _item_alerts(item: MonitoredItem, *, active: set[tuple[int, str]], raises: list[AlertChange],
                 resolves: list[AlertChange]) -> None:
    """Add the item's alerts that start to ``raises`` and those that end to ``resolves``."""
    threshold = item.policy.rpo_threshold_minutes * 60
    rpo_reason = next((r for r in item.health_reasons if r.startswith("RPO ")), None)
    agent_silent = any("stopped sending heartbeats" in r for r in item.health_reasons)
    # Critical reasons that have an alert of their own are not alerted twice.
    other_critical = item.health == Health.CRITICAL and not (rpo_reason and item.rpo_seconds and item.rpo_seconds > 2 * threshold) and not agent_silent
    checks = [
        (
            f"rpo:{item.pk}", "rpo_exceeded",
            item.rpo_seconds is not None and item.rpo_seconds > threshold and item.protection_state in (P.PROTECTED, P.RESYNC_REQUIRED, P.RESYNCING),
            f"RPO of {item.name} is {_minutes(item.rpo_seconds or 0)}, above its threshold of {_minutes(threshold)}.",
            f"RPO of {item.name} is back within its threshold ({_minutes(item.rpo_seconds or 0)}).",
            Severity.CRITICAL if (item.rpo_seconds or 0) > 2 * threshold else Severity.WARNING,
        ),
        (
            f"critical:{item.pk}", "item_critical", other_critical,
            f"{item.name} is critical: {' '.join(item.health_reasons)}",
            f"{item.name} is no longer critical.",
            Severity.CRITICAL,
        ),
        (
            f"agent:{item.pk}", "agent_heartbeat_lost", agent_silent,
            f"The mobility agent of {item.name} has stopped sending heartbeats.",
            f"The mobility agent of {item.name} is sending heartbeats again.",
            Severity.CRITICAL,
        ),
    ]
    for key, kind, problem, message, end_message, severity in checks:
        is_open = (item.vault_id, key) in active
        if problem and not is_open:
            raises.append(AlertChange(item.vault, key, kind, message, severity, {"protected_item_id": item.id}))
        elif not problem and is_open:
            resolves.append(AlertChange(item.vault, key, kind, end_message))


def _active_alert_keys() -> set[tuple[int, str]]:
    """Every open alert's (vault, key), in one query: the sweep touches only what changes."""
    return set(Alert.objects.filter(state="ACTIVE").values_list("vault_id", "key"))


def process_server_health(ps: ProcessServer, *, now) -> tuple[str, list[str]]:
    reasons: list[tuple[str, str]] = []
    if ps.last_heartbeat_at is None or (now - ps.last_heartbeat_at).total_seconds() > settings.LIFEBOAT_HEARTBEAT_TIMEOUT:
        if ps.last_heartbeat_at is not None or (now - ps.created_at).total_seconds() > settings.LIFEBOAT_HEARTBEAT_TIMEOUT:
            reasons.append((Health.CRITICAL, "No heartbeat from the process server" + (
                f" for {_minutes((now - ps.last_heartbeat_at).total_seconds())}." if ps.last_heartbeat_at else " yet.")))
    for value, (warn, crit), what in ((ps.cpu_percent, PS_CPU, "CPU"), (ps.memory_percent, PS_MEMORY, "Memory")):
        if value is not None and value >= crit:
            reasons.append((Health.CRITICAL, f"{what} use is {value:.0f}% (critical above {crit:.0f}%)."))
        elif value is not None and value >= warn:
            reasons.append((Health.WARNING, f"{what} use is {value:.0f}% (warning above {warn:.0f}%)."))
    if ps.cache_free_bytes is not None and ps.cache_total_bytes:
        free = 100.0 * ps.cache_free_bytes / ps.cache_total_bytes
        warn, crit = PS_CACHE_FREE_PERCENT
        if free < crit:
            reasons.append((Health.CRITICAL, f"Only {free:.0f}% of the cache volume is free (critical below {crit:.0f}%)."))
        elif free < warn:
            reasons.append((Health.WARNING, f"Only {free:.0f}% of the cache volume is free (warning below {warn:.0f}%)."))
    health = Health.CRITICAL if any(l == Health.CRITICAL for l, _ in reasons) else Health.WARNING if reasons else Health.HEALTHY
    return health, [t for _, t in reasons]


def process_servers_monitor(*, now=None) -> dict:
    now = now or timezone.now()
    servers = list(ProcessServer.objects.select_related("vault"))
    active = _active_alert_keys()
    changed = []
    resolves: list[AlertChange] = []
    for ps in servers:
        health, reasons = process_server_health(ps, now=now)
        if (health, reasons) != (ps.health, ps.health_reasons):
            ps.health, ps.health_reasons = health, reasons
            changed.append(ps)
        key = f"ps:{ps.pk}"
        if health == Health.HEALTHY:
            if (ps.vault_id, key) in active:
                resolves.append(AlertChange(ps.vault, key, "process_server_unhealthy",
                                            f"Process server {ps.name} is healthy again."))
        elif (ps.vault_id, key) not in active or ps in changed:
            alert_raise(
                vault=ps.vault, key=key, kind="process_server_unhealthy",
                message=f"Process server {ps.name} is {health.label.lower()}: {' '.join(reasons)}",
                severity=Severity.CRITICAL if health == Health.CRITICAL else Severity.WARNING, now=now, process_server=ps,
            )
    alerts_apply(raise_=[], resolve=resolves, now=now)
    ProcessServer.objects.bulk_update(changed, ["health", "health_reasons"])
    return {"process_servers": len(servers), "changed": len(changed)}
