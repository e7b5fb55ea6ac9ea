"""What the control plane does at many items, pinned by query counts (bench/bench_control_plane.py
measures the times): the API lists of items, recovery points, jobs, events and alerts for a
superuser and for a Reader of one vault; the apply sweep's scheduling (chunks on the real
broker); the retention prune's mirror of an item's points; the monitoring sweep's RPO,
written in one statement."""
from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from celery.signals import before_task_publish
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from core.choices import JobState, JobType
from core.models import Job
from core.queues import APPLY
from lifeboat.celery import app
from replication.choices import ProtectionState as P
from replication.dataplane.apply import RecoveryPoint as PlanePoint
from replication.engine import points_mirror
from replication.models import ProtectedItem, RecoveryPoint
from replication.monitoring import item_health, items_monitor
from replication.tasks import APPLY_CHUNK, APPLY_SPREAD, apply_chunks, apply_items, apply_sweep
from replication.waits import item_wait_key
from tests.conftest import grant_role
from tests.factories import PolicyFactory, ProcessServerFactory, ProtectedItemFactory, VaultFactory
from tests.fleet import Fleet

pytestmark = pytest.mark.django_db

API = "/api/v1"
LISTS = ["replicationProtectedItems", "recoveryPoints", "replicationJobs", "replicationEvents", "replicationAlerts",
         "replicationProtectableItems"]


# --- API lists -------------------------------------------------------------------------------


@pytest.fixture
def fleets(vault, admin_user):
    mine = Fleet(vault, user=admin_user)
    other = Fleet(VaultFactory(name="zz-other-vault"), user=admin_user)
    return mine, other


def _api_costs(client) -> dict[str, tuple[int, int]]:
    """Per list: (queries of its first page at the default size, rows it counts)."""
    out = {}
    for resource in LISTS:
        for params in ({}, {"page_size": 100}):
            with CaptureQueriesContext(connection) as ctx:
                response = client.get(f"{API}/{resource}/", params)
            assert response.status_code == 200, (resource, response.content[:300])
            out[f"{resource} {params}"] = (len(ctx.captured_queries), response.json()["count"])
    return out


@pytest.mark.parametrize("who", ["superuser", "reader"])
def test_api_lists_use_a_fixed_number_of_queries_for_every_user(fleets, admin_user, viewer_user, who):
    mine, other = fleets
    client = APIClient()
    if who == "reader":
        grant_role(viewer_user, mine.vault, "READER")
        client.force_authenticate(viewer_user)
    else:
        client.force_authenticate(admin_user)
    mine.grow(5)
    other.grow(2)
    few = _api_costs(client)
    mine.grow(50)
    other.grow(10)
    many = _api_costs(client)
    grown = {k: (few[k][0], many[k][0]) for k in few if few[k][0] != many[k][0]}
    assert not grown, f"queries (small fleet, large fleet) that grow with the rows: {grown}"
    # The Reader's lists hold their vault's rows only; the superuser's every vault's.
    items = many["replicationProtectedItems {}"][1]
    assert items == (55 if who == "reader" else 67)
    assert many["recoveryPoints {}"][1] == 2 * items


def test_the_item_list_does_not_join_lookup_tables_into_its_query(api, fleets):
    """Each table joined into a list's query multiplies PostgreSQL's planning time: the
    recovery site, its networks and a failback come in queries of their own."""
    mine, _ = fleets
    mine.grow(3)
    with CaptureQueriesContext(connection) as ctx:
        body = api.get(f"{API}/replicationProtectedItems/").json()
    page = next(q["sql"] for q in ctx.captured_queries
                if q["sql"].startswith('SELECT "replication_protecteditem"."created_at"') and " LIMIT " in q["sql"])
    assert page.count(" JOIN ") == 3, page  # machine, policy, process server
    first = body["results"][0]
    assert (first["recovery_site_name"], first["recovery_network_name"], first["test_network_name"]) == (
        mine.site.name, "recovery-net", "test-net")


# --- the apply sweep's scheduling ------------------------------------------------------------


class Published:
    """What Celery publishes to the broker (its own signal, sent as each message goes out)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list]] = []

    def __call__(self, sender=None, body=None, headers=None, **kw) -> None:
        args = body[0] if isinstance(body, (list, tuple)) else []
        self.messages.append((headers.get("task") if headers else sender, args))


@pytest.fixture
def published():
    seen = Published()
    before_task_publish.connect(seen, weak=False)
    yield seen
    before_task_publish.disconnect(seen)
    with app.connection_for_write() as conn:  # nothing of this test is left for a worker
        conn.default_channel.queue_purge(APPLY)


def _replicating_fleet(vault, n: int) -> list[str]:
    """n items whose data flows, plus items the sweep must leave alone."""
    policy, server = PolicyFactory(vault=vault), ProcessServerFactory(vault=vault)
    ids = []
    for i in range(n):
        state = [P.PROTECTED, P.INITIAL_REPLICATION, P.RESYNC_REQUIRED, P.RESYNCING][i % 4]
        ids.append(str(ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=state).pk))
    ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.FAILED_OVER)
    ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.PROTECTED,
                         apply_lease_until=timezone.now() + timedelta(seconds=60))  # a pass is running
    ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.PROTECTED,
                         last_applied_at=timezone.now() - timedelta(seconds=1))  # an upload's pass just ended
    ids.append(str(ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.PROTECTED,
                                        last_applied_at=timezone.now() - timedelta(seconds=10)).pk))  # wake-ups stopped
    return ids


def _sweep(published) -> tuple[int, list[list[str]]]:
    published.messages.clear()
    with CaptureQueriesContext(connection) as ctx:
        assert apply_sweep() == sum(len(a[0]) for _, a in published.messages)
    assert {task for task, _ in published.messages} <= {"replication.apply_items"}
    return len(ctx.captured_queries), [args[0] for _, args in published.messages]


@pytest.mark.parametrize("n", [3, 20, 400])
def test_the_apply_sweep_sends_every_replicating_item_once_in_a_few_messages(vault, published, n):
    ids = _replicating_fleet(vault, n)
    queries, chunks = _sweep(published)
    assert queries == 1
    assert sorted(i for chunk in chunks for i in chunk) == sorted(ids)  # each once; not the failed over, the leased, the just applied
    # Enough messages for the apply workers to share the items, never more than a chunk in one.
    assert min(n, APPLY_SPREAD) <= len(chunks) <= max(2 * APPLY_SPREAD, -(-n // APPLY_CHUNK))
    assert max(len(c) for c in chunks) <= APPLY_CHUNK
    assert chunks == apply_chunks(ids=[i for chunk in chunks for i in chunk])


def test_the_apply_sweep_queries_do_not_grow_with_the_items(vault, published):
    _replicating_fleet(vault, 5)
    few, _ = _sweep(published)
    _replicating_fleet(vault, 120)
    many, chunks = _sweep(published)
    assert few == many == 1 and sum(map(len, chunks)) == 127


def test_apply_chunks_spread_small_sweeps_and_bound_large_ones():
    assert apply_chunks([]) == []
    assert apply_chunks(["a", "b"]) == [["a"], ["b"]]
    ids = [str(n) for n in range(100)]
    assert [len(c) for c in apply_chunks(ids)] == [12] * 8 + [4]
    big = [str(n) for n in range(9800)]
    chunks = apply_chunks(big)
    assert len(chunks) == 196 and {len(c) for c in chunks} == {50} and sum(chunks, []) == big


def test_a_chunk_goes_on_after_an_item_whose_pass_fails(vault, caplog):
    """Each item of a chunk gets its pass (its waiting jobs are woken at the end of it), even
    after one whose pass raised."""
    policy, server = PolicyFactory(vault=vault), ProcessServerFactory(vault=vault)
    items = [ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.INITIAL_REPLICATION)
             for _ in range(2)]
    waiting = [Job.objects.create(vault=vault, type=JobType.ENABLE_REPLICATION, state=JobState.WAITING,
                                  wait_key=item_wait_key(item.pk), target_name=item.name) for item in items]
    with caplog.at_level(logging.ERROR, logger="replication.tasks"):
        apply_items([str(items[0].pk), "not-an-item-id", str(items[1].pk)])
    assert [Job.objects.get(pk=j.pk).state for j in waiting] == [JobState.QUEUED, JobState.QUEUED]
    assert "The apply pass of item not-an-item-id failed" in caplog.text


# --- the retention prune's mirror ------------------------------------------------------------


def _points(item, n: int, newest) -> list[PlanePoint]:
    return [PlanePoint(point_id=f"{item.pk.hex[:8]}-{k}", seq=k + 1, source_time_ns=int((newest - timedelta(hours=n - 1 - k)).timestamp() * 1e9),
                       kind="crash_consistent", label=None, snapshots={}) for k in range(n)]


def _prune_costs(vault, n: int) -> tuple[int, list[str]]:
    now = timezone.now().replace(microsecond=0)
    item = ProtectedItemFactory(vault=vault, protection_state=P.PROTECTED)
    points = _points(item, n, now)
    points_mirror(item=item, points=points)
    assert RecoveryPoint.objects.filter(item=item).count() == n
    kept = points[-2:]  # the data plane pruned every point but the newest two
    with CaptureQueriesContext(connection) as ctx:
        points_mirror(item=item, points=kept)
    assert sorted(RecoveryPoint.objects.filter(item=item).values_list("point_id", flat=True)) == sorted(p.point_id for p in kept)
    assert ProtectedItem.objects.get(pk=item.pk).last_recovery_point_at == now
    # An apply pass with nothing new: the item's point ids are read, no row is written.
    with CaptureQueriesContext(connection) as idle:
        points_mirror(item=item, points=kept)
    return len(ctx.captured_queries), [q["sql"].split()[0] for q in idle.captured_queries]


def test_the_retention_prune_uses_the_same_queries_for_few_and_many_points(vault):
    few, idle = _prune_costs(vault, 5)
    many, idle_many = _prune_costs(vault, 60)
    assert few == many, f"pruning 3 points: {few} queries, 58 points: {many}"
    assert "DELETE" not in idle and idle == idle_many
    # The UPDATE an idle pass sends matches no row: last_recovery_point_at is already right.
    assert idle.count("UPDATE") == 1


# --- the monitoring sweep's RPO --------------------------------------------------------------


def test_the_rpo_written_in_one_statement_is_the_one_item_health_computes(vault):
    now = timezone.now()
    policy, server = PolicyFactory(vault=vault), ProcessServerFactory(vault=vault)
    ages = [timedelta(0), timedelta(microseconds=999_999), timedelta(seconds=59, microseconds=500_000),
            timedelta(minutes=25, seconds=1), timedelta(days=3, microseconds=1), -timedelta(seconds=5)]
    items = [ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.PROTECTED,
                                  agent_last_heartbeat_at=now, last_recovery_point_at=now - age) for age in ages]
    gone = ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.PROTECTED,
                                agent_last_heartbeat_at=now, rpo_seconds=600)  # its points were all removed
    items_monitor(now=now)
    for item in items:
        fresh = ProtectedItem.objects.select_related("policy").get(pk=item.pk)
        assert fresh.rpo_seconds == item_health(fresh, now=now)[0], (fresh.last_recovery_point_at, fresh.rpo_seconds)
    assert [ProtectedItem.objects.get(pk=i.pk).rpo_seconds for i in items] == [0, 0, 59, 25 * 60 + 1, 3 * 86400, 0]
    assert ProtectedItem.objects.get(pk=gone.pk).rpo_seconds is None
    # Health follows: the item 25 minutes behind its 15-minute threshold is in warning.
    assert ProtectedItem.objects.get(pk=items[3].pk).health == "WARNING"


# --- the monitoring sweep's alerts ------------------------------------------------------------


def _alert_sweep_costs(vault, n: int) -> tuple[int, int, int]:
    """(queries of a sweep raising alerts for n items, of the sweep resolving them, of one
    raising them again inside the quiet period, which reopens the same alerts)."""
    from vault.models import Alert, Event

    now = timezone.now()
    policy, server = PolicyFactory(vault=vault, rpo_threshold_minutes=1), ProcessServerFactory(vault=vault)
    items = [ProtectedItemFactory(vault=vault, policy=policy, process_server=server, protection_state=P.PROTECTED,
                                  agent_last_heartbeat_at=now, last_recovery_point_at=now - timedelta(minutes=5))
             for _ in range(n)]
    counts = []
    with CaptureQueriesContext(connection) as ctx:
        assert items_monitor(now=now)["alerts_raised"] == n
    counts.append(len(ctx.captured_queries))
    keys = {f"rpo:{i.pk}" for i in items}
    raised = Alert.objects.filter(vault=vault, key__in=keys, state="ACTIVE")
    assert raised.count() == n and Event.objects.filter(vault=vault, kind="rpo_exceeded").count() == n
    first_ids = set(raised.values_list("pk", flat=True))
    ProtectedItem.objects.filter(pk__in=[i.pk for i in items]).update(last_recovery_point_at=now)
    with CaptureQueriesContext(connection) as ctx:
        assert items_monitor(now=now)["alerts_resolved"] == n
    counts.append(len(ctx.captured_queries))
    assert not Alert.objects.filter(vault=vault, key__in=keys, state="ACTIVE").exists()
    assert Event.objects.filter(vault=vault, kind="rpo_exceeded_resolved").count() == n
    ProtectedItem.objects.filter(pk__in=[i.pk for i in items]).update(last_recovery_point_at=now - timedelta(minutes=5))
    with CaptureQueriesContext(connection) as ctx:
        assert items_monitor(now=now + timedelta(seconds=30))["alerts_raised"] == 0  # reopened, not new
    counts.append(len(ctx.captured_queries))
    assert set(Alert.objects.filter(vault=vault, key__in=keys, state="ACTIVE").values_list("pk", flat=True)) == first_ids
    assert Alert.objects.filter(vault=vault, key__in=keys).count() == n
    return tuple(counts)


def test_the_monitoring_sweep_raises_resolves_and_reopens_many_alerts_in_the_same_queries_as_few():
    few = _alert_sweep_costs(VaultFactory(name="few-alerts"), 3)
    many = _alert_sweep_costs(VaultFactory(name="many-alerts"), 40)
    assert few == many, f"3 items' alerts: {few} queries, 40 items': {many}"
