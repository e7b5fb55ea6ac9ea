"""Monitoring: RPO and health of protected items and process servers, and the alerts they raise.

RPO is now minus the source time of the item's newest recovery point. Every sweep here is given
its ``now``, so time moves only when a test says so.
"""
from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from replication.choices import ProtectionState as P
from replication.dataplane.apply import RecoveryPoint as PlanePoint
from replication.engine import points_mirror
from replication.models import ProtectedItem
from replication.monitoring import items_monitor, process_servers_monitor
from tests.factories import PolicyFactory, ProcessServerFactory, ProtectedItemFactory
from vault.choices import AlertState, Health, Severity
from vault.models import Alert, Event, ProcessServer

pytestmark = pytest.mark.django_db

API = "/api/v1"
MIN = 60
GIB = 1024**3
_seq = itertools.count(1)


@pytest.fixture
def t0():
    """The sweeps' clock starts at the real current time (rows get real creation times)."""
    return timezone.now().replace(microsecond=0)


@pytest.fixture
def policy(vault):
    return PolicyFactory(vault=vault, rpo_threshold_minutes=10)


@pytest.fixture
def server(vault):
    return ProcessServerFactory(vault=vault)


def make_item(vault, policy, server, *, heartbeat_at, state=P.PROTECTED, **fields) -> ProtectedItem:
    return ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=state,
                                agent_last_heartbeat_at=heartbeat_at, **fields)


def set_points(item: ProtectedItem, *times) -> None:
    """The data plane reports these recovery points (source times) for the item."""
    points = [
        PlanePoint(point_id=f"p{next(_seq)}", seq=i + 1, source_time_ns=int(t.timestamp() * 1e9),
                   kind="crash_consistent", label=None, snapshots={})
        for i, t in enumerate(times)
    ]
    points_mirror(item=item, points=points)


def heartbeat(item: ProtectedItem, at) -> None:
    ProtectedItem.objects.filter(pk=item.pk).update(agent_last_heartbeat_at=at)


def fresh(item: ProtectedItem) -> ProtectedItem:
    return ProtectedItem.objects.get(pk=item.pk)


def alerts(**filters) -> list[Alert]:
    return list(Alert.objects.filter(**filters).order_by("raised_at"))


# --- RPO and item health -----------------------------------------------------------------


def test_rpo_is_now_minus_the_newest_recovery_points_time(vault, policy, server, t0):
    item = make_item(vault, policy, server, heartbeat_at=t0)
    never = make_item(vault, policy, server, heartbeat_at=t0)
    # Listed out of order: the newest point counts, not the last one listed.
    set_points(item, t0 - timedelta(minutes=40), t0 - timedelta(minutes=4), t0 - timedelta(minutes=20))

    summary = items_monitor(now=t0)

    item = fresh(item)
    assert item.rpo_seconds == 4 * MIN
    assert (item.health, item.health_reasons) == (Health.HEALTHY, [])
    assert fresh(never).rpo_seconds is None  # no recovery point yet: no RPO
    assert summary["items"] == 2 and summary["alerts_raised"] == 0
    # The same points, judged three minutes later.
    items_monitor(now=t0 + timedelta(minutes=3))
    assert fresh(item).rpo_seconds == 7 * MIN
    assert not Alert.objects.exists()


@pytest.mark.parametrize(
    ("age_seconds", "health"),
    [
        (9 * MIN, Health.HEALTHY),
        (10 * MIN, Health.HEALTHY),  # at the threshold, not above it
        (10 * MIN + 1, Health.WARNING),
        (20 * MIN, Health.WARNING),  # at twice the threshold, not above it
        (20 * MIN + 1, Health.CRITICAL),
        (3 * 60 * MIN, Health.CRITICAL),
    ],
)
def test_health_from_rpo_against_the_policys_threshold(vault, policy, server, t0, age_seconds, health):
    item = make_item(vault, policy, server, heartbeat_at=t0)
    set_points(item, t0 - timedelta(seconds=age_seconds))

    items_monitor(now=t0)

    item = fresh(item)
    assert item.rpo_seconds == age_seconds
    assert item.health == health
    if health == Health.HEALTHY:
        assert item.health_reasons == []
    else:
        assert len(item.health_reasons) == 1
        assert "is above the policy's threshold of 10 min" in item.health_reasons[0]
        assert item.health_reasons[0].startswith(f"RPO {age_seconds / 60:.0f} min")


def test_initial_replication_is_not_judged_by_rpo(vault, policy, server, t0):
    item = make_item(vault, policy, server, heartbeat_at=t0, state=P.INITIAL_REPLICATION)
    set_points(item, t0 - timedelta(hours=2))

    items_monitor(now=t0)

    item = fresh(item)
    assert item.rpo_seconds == 2 * 60 * MIN
    assert item.health == Health.HEALTHY
    assert not Alert.objects.exists()


def test_resync_required_is_a_warning_with_its_reason(vault, policy, server, t0):
    item = make_item(vault, policy, server, heartbeat_at=t0, state=P.RESYNC_REQUIRED)
    set_points(item, t0 - timedelta(minutes=2))

    items_monitor(now=t0)

    item = fresh(item)
    assert item.health == Health.WARNING
    assert item.health_reasons == ["Resynchronization is required: data may have been lost in transit."]
    # A warning that is not about RPO raises no RPO alert and no critical alert.
    assert not Alert.objects.exists()


def test_agent_silence_is_critical_with_an_alert_until_it_speaks_again(vault, policy, server, settings, t0):
    settings.LIFEBOAT_HEARTBEAT_TIMEOUT = 15 * MIN
    item = make_item(vault, policy, server, heartbeat_at=t0)
    set_points(item, t0 + timedelta(minutes=15))

    items_monitor(now=t0 + timedelta(minutes=15))  # silent for exactly the timeout: still fine
    assert fresh(item).health == Health.HEALTHY
    assert not Alert.objects.exists()

    later = t0 + timedelta(minutes=16)
    set_points(item, later)  # recovery points still arrive: only the agent's heartbeat is missing
    items_monitor(now=later)

    item = fresh(item)
    assert item.health == Health.CRITICAL
    assert item.health_reasons == ["The mobility agent has stopped sending heartbeats (silent for 16 min)."]
    lost = alerts(kind="agent_heartbeat_lost")
    assert len(lost) == 1
    assert lost[0].state == AlertState.ACTIVE and lost[0].severity == Severity.CRITICAL
    assert lost[0].protected_item_id == item.pk and lost[0].key == f"agent:{item.pk}"
    assert item.name in lost[0].message
    assert Event.objects.filter(kind="agent_heartbeat_lost", protected_item=item).count() == 1

    heartbeat(item, later + timedelta(minutes=1))
    items_monitor(now=later + timedelta(minutes=1))

    assert fresh(item).health == Health.HEALTHY
    assert Alert.objects.get(pk=lost[0].pk).state == AlertState.RESOLVED
    assert not Alert.objects.filter(state=AlertState.ACTIVE).exists()


def test_an_agent_that_never_sent_a_heartbeat_gets_the_timeout_before_it_is_critical(vault, policy, server, settings, t0):
    settings.LIFEBOAT_HEARTBEAT_TIMEOUT = 15 * MIN
    item = make_item(vault, policy, server, heartbeat_at=None)
    created = fresh(item).created_at

    items_monitor(now=created + timedelta(minutes=5))
    assert fresh(item).health == Health.HEALTHY

    items_monitor(now=created + timedelta(minutes=20))
    item = fresh(item)
    assert item.health == Health.CRITICAL
    assert item.health_reasons == ["The mobility agent has stopped sending heartbeats (never sent one)."]
    assert [a.kind for a in alerts(state=AlertState.ACTIVE, kind="agent_heartbeat_lost")] == ["agent_heartbeat_lost"]


def test_rpo_alert_is_raised_once_and_resolved_when_rpo_drops(vault, policy, server, t0):
    item = make_item(vault, policy, server, heartbeat_at=t0)
    set_points(item, t0 - timedelta(minutes=12))

    summaries = []
    for minute in range(0, 6):  # six sweeps, a minute apart, while the breach goes on
        now = t0 + timedelta(minutes=minute)
        heartbeat(item, now)
        summaries.append(items_monitor(now=now))

    assert [s["alerts_raised"] for s in summaries] == [1, 0, 0, 0, 0, 0]
    rpo_alerts = alerts(key=f"rpo:{item.pk}")
    assert len(rpo_alerts) == 1
    alert = rpo_alerts[0]
    assert (alert.kind, alert.state, alert.severity) == ("rpo_exceeded", AlertState.ACTIVE, Severity.WARNING)
    assert alert.message == f"RPO of {item.name} is 12 min, above its threshold of 10 min."
    assert Event.objects.filter(kind="rpo_exceeded", protected_item=item).count() == 1
    assert fresh(item).rpo_seconds == 17 * MIN and fresh(item).health == Health.WARNING

    # Replication catches up: a new point, and the next sweep resolves the alert.
    back = t0 + timedelta(minutes=6)
    set_points(item, back - timedelta(seconds=30))
    heartbeat(item, back)
    summary = items_monitor(now=back)

    assert summary["alerts_resolved"] == 1
    alert.refresh_from_db()
    assert alert.state == AlertState.RESOLVED and alert.resolved_at == back
    resolved = Event.objects.get(kind="rpo_exceeded_resolved")
    assert resolved.protected_item_id == item.pk and "back within its threshold" in resolved.message
    assert (fresh(item).health, fresh(item).rpo_seconds) == (Health.HEALTHY, 30)
    assert items_monitor(now=back + timedelta(seconds=10))["alerts_resolved"] == 0


def test_rpo_above_twice_the_threshold_is_one_critical_alert(vault, policy, server, t0):
    """The item turns critical because of its RPO: one alert (and one e-mail), not two."""
    item = make_item(vault, policy, server, heartbeat_at=t0)
    set_points(item, t0 - timedelta(minutes=25))

    items_monitor(now=t0)

    active = {a.kind: a for a in alerts(state=AlertState.ACTIVE)}
    assert set(active) == {"rpo_exceeded"}
    assert active["rpo_exceeded"].severity == Severity.CRITICAL
    assert fresh(item).health == Health.CRITICAL
    assert "25 min, above its threshold of 10 min" in active["rpo_exceeded"].message


def test_other_critical_reasons_raise_the_critical_alert(vault, policy, server, t0):
    item = make_item(vault, policy, server, heartbeat_at=t0)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="ENABLE_FAILED")

    items_monitor(now=t0)

    active = {a.kind: a for a in alerts(state=AlertState.ACTIVE)}
    assert set(active) == {"item_critical"}
    assert "Enabling protection failed" in active["item_critical"].message


# --- process servers -----------------------------------------------------------------------


def _figures(t0, **overrides) -> dict:
    figures = dict(last_heartbeat_at=t0, cpu_percent=40.0, memory_percent=50.0,
                   cache_free_bytes=60 * GIB, cache_total_bytes=100 * GIB)
    figures.update(overrides)
    return figures


@pytest.mark.parametrize(
    ("overrides", "health", "reason"),
    [
        ({}, Health.HEALTHY, None),
        ({"cpu_percent": 79.0}, Health.HEALTHY, None),
        ({"cpu_percent": 85.0}, Health.WARNING, "CPU use is 85% (warning above 80%)."),
        ({"cpu_percent": 96.0}, Health.CRITICAL, "CPU use is 96% (critical above 95%)."),
        ({"memory_percent": 82.0}, Health.WARNING, "Memory use is 82% (warning above 80%)."),
        ({"memory_percent": 99.0}, Health.CRITICAL, "Memory use is 99% (critical above 95%)."),
        ({"cache_free_bytes": 30 * GIB}, Health.HEALTHY, None),
        ({"cache_free_bytes": 28 * GIB}, Health.WARNING, "Only 28% of the cache volume is free (warning below 30%)."),
        ({"cache_free_bytes": 20 * GIB}, Health.CRITICAL, "Only 20% of the cache volume is free (critical below 25%)."),
        ({"last_heartbeat_at": "16 min ago"}, Health.CRITICAL, "No heartbeat from the process server for 16 min."),
    ],
)
def test_process_server_health_follows_asrs_thresholds(vault, settings, t0, overrides, health, reason):
    settings.LIFEBOAT_HEARTBEAT_TIMEOUT = 15 * MIN
    if overrides.get("last_heartbeat_at") == "16 min ago":
        overrides["last_heartbeat_at"] = t0 - timedelta(minutes=16)
    ps = ProcessServerFactory(vault=vault, **_figures(t0, **overrides))

    process_servers_monitor(now=t0)

    ps.refresh_from_db()
    assert ps.health == health
    assert ps.health_reasons == ([] if reason is None else [reason])
    active = alerts(state=AlertState.ACTIVE)
    if health == Health.HEALTHY:
        assert active == []
    else:
        assert len(active) == 1
        alert = active[0]
        assert (alert.kind, alert.key, alert.process_server_id) == ("process_server_unhealthy", f"ps:{ps.pk}", ps.pk)
        assert alert.severity == (Severity.CRITICAL if health == Health.CRITICAL else Severity.WARNING)
        assert alert.message == f"Process server {ps.name} is {health.lower()}: {reason}"


def test_process_server_without_any_heartbeat_is_critical_after_the_timeout(vault, settings):
    settings.LIFEBOAT_HEARTBEAT_TIMEOUT = 15 * MIN
    ps = ProcessServerFactory(vault=vault)
    created = ps.created_at

    process_servers_monitor(now=created + timedelta(minutes=1))
    ps.refresh_from_db()
    assert ps.health == Health.HEALTHY  # just added: it gets the timeout to report

    process_servers_monitor(now=created + timedelta(minutes=16))
    ps.refresh_from_db()
    assert (ps.health, ps.health_reasons) == (Health.CRITICAL, ["No heartbeat from the process server yet."])


def test_process_server_alert_follows_its_health_as_one_alert(vault, settings, t0):
    settings.LIFEBOAT_HEARTBEAT_TIMEOUT = 15 * MIN
    ps = ProcessServerFactory(vault=vault, **_figures(t0, cpu_percent=85.0))

    process_servers_monitor(now=t0)
    process_servers_monitor(now=t0 + timedelta(seconds=30))  # unchanged: nothing new
    assert len(alerts()) == 1 and alerts()[0].severity == Severity.WARNING

    # It gets worse: the same alert becomes critical, with the new reasons.
    ProcessServer.objects.filter(pk=ps.pk).update(cpu_percent=97.0, cache_free_bytes=10 * GIB)
    process_servers_monitor(now=t0 + timedelta(minutes=1))
    (alert,) = alerts()
    assert alert.state == AlertState.ACTIVE and alert.severity == Severity.CRITICAL
    assert "CPU use is 97%" in alert.message and "Only 10% of the cache volume is free" in alert.message
    assert Event.objects.filter(kind="process_server_unhealthy").count() == 1

    # Healthy again: resolved, with an event saying so.
    ProcessServer.objects.filter(pk=ps.pk).update(cpu_percent=30.0, cache_free_bytes=70 * GIB,
                                                  last_heartbeat_at=t0 + timedelta(minutes=2))
    process_servers_monitor(now=t0 + timedelta(minutes=2))
    alert.refresh_from_db()
    assert alert.state == AlertState.RESOLVED and alert.resolved_at == t0 + timedelta(minutes=2)
    assert Event.objects.filter(kind="process_server_unhealthy_resolved", process_server=ps).count() == 1
    ps.refresh_from_db()
    assert (ps.health, ps.health_reasons) == (Health.HEALTHY, [])


# --- the sweep's cost --------------------------------------------------------------------


def _fleet(vault, policy, server, n: int, t0) -> None:
    """n protected items: every third one past its RPO threshold (its alert stays open)."""
    for i in range(n):
        item = make_item(vault, policy, server, heartbeat_at=t0 + timedelta(hours=1))
        set_points(item, t0 - timedelta(minutes=15 if i % 3 == 0 else 1))


def _sweep_queries(now) -> tuple[int, dict]:
    with CaptureQueriesContext(connection) as ctx:
        summary = items_monitor(now=now)
    return len(ctx.captured_queries), summary


def _steady_costs(t0) -> tuple[int, int]:
    """Queries of a sweep where nothing changes, and of one where every RPO moved on."""
    first = items_monitor(now=t0)  # raises the alerts of the items past their threshold
    assert first["alerts_raised"] > 0
    same, summary = _sweep_queries(t0)
    assert summary["changed"] == 0 and summary["alerts_raised"] == summary["alerts_resolved"] == 0
    moved, summary = _sweep_queries(t0 + timedelta(seconds=20))
    assert summary["changed"] == summary["items"] and summary["alerts_raised"] == 0
    return same, moved


def test_the_sweeps_queries_do_not_grow_with_the_number_of_items(policy, server, t0):
    vault = policy.vault
    _fleet(vault, policy, server, 5, t0)
    small = _steady_costs(t0)

    _fleet(vault, policy, server, 95, t0)
    Alert.objects.all().delete()
    ProtectedItem.objects.update(rpo_seconds=None, health=Health.HEALTHY, health_reasons=[])
    large = _steady_costs(t0)

    assert ProtectedItem.objects.count() == 100
    assert Alert.objects.filter(kind="rpo_exceeded", state=AlertState.ACTIVE).count() == 34
    assert small == large, f"5 items: {small} queries, 100 items: {large}"
    # Nothing changed: the items, their vaults, their policies and the open alerts. Every RPO
    # moved: one UPDATE more, for all the items at once.
    assert small[0] <= 4 and small[1] == small[0] + 1, small


def test_process_server_sweep_queries_do_not_grow_with_the_number_of_servers(vault, t0):
    def costs(n: int) -> int:
        for _ in range(n):
            ProcessServerFactory(vault=vault, **_figures(t0, cpu_percent=90.0))
        process_servers_monitor(now=t0)
        with CaptureQueriesContext(connection) as ctx:
            summary = process_servers_monitor(now=t0)
        assert summary["changed"] == 0
        return len(ctx.captured_queries)

    assert costs(3) == costs(40)
    assert Alert.objects.filter(kind="process_server_unhealthy", state=AlertState.ACTIVE).count() == 43


# --- acknowledging -----------------------------------------------------------------------


def test_alert_can_be_acknowledged_through_the_api_and_stays_one_alert(api, admin_user, vault, policy, server, t0):
    item = make_item(vault, policy, server, heartbeat_at=t0)
    set_points(item, t0 - timedelta(minutes=12))
    items_monitor(now=t0)
    (alert,) = alerts()

    listed = api.get(f"{API}/replicationAlerts/", {"vault": vault.pk, "acknowledged": "false"}).json()
    assert [a["id"] for a in listed["results"]] == [str(alert.pk)]

    response = api.post(f"{API}/replicationAlerts/{alert.pk}/acknowledge/")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["acknowledged"] is True and body["acknowledged_by"] == admin_user.pk
    assert body["state"] == AlertState.ACTIVE  # acknowledged, the problem goes on
    # Later sweeps keep the acknowledged alert and raise no new one.
    for minute in (1, 2):
        heartbeat(item, t0 + timedelta(minutes=minute))
        items_monitor(now=t0 + timedelta(minutes=minute))
    (same,) = alerts()
    assert same.pk == alert.pk and same.acknowledged and same.state == AlertState.ACTIVE
    assert api.get(f"{API}/replicationAlerts/", {"vault": vault.pk, "acknowledged": "false"}).json()["count"] == 0

    set_points(item, t0 + timedelta(minutes=3))
    items_monitor(now=t0 + timedelta(minutes=3))
    detail = api.get(f"{API}/replicationAlerts/{alert.pk}/").json()
    assert detail["state"] == AlertState.RESOLVED and detail["acknowledged"] is True
