"""GET /metrics (lifeboat/metrics.py): scraped, parsed with Prometheus' own parsers, and
checked against the database."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from core.models import Job
from replication.data_path import process_server_data_path_record
from replication.models import ProtectedItem
from tests.factories import ProcessServerFactory, ProtectedItemFactory, VaultFactory
from vault.models import ProcessServer


def scrape(client: Client | None = None, **headers) -> dict[str, dict]:
    r = (client or Client()).get("/metrics", **headers)
    assert r.status_code == 200, r.content
    assert r["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(text_string_to_metric_families(r.content.decode()))


def samples(families) -> dict[str, dict]:
    """{sample name: {labels as a sorted tuple: value}}."""
    out: dict[str, dict] = {}
    for family in families:
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def labels(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def item_labels(item: ProtectedItem, **extra) -> tuple:
    return labels(vault=item.vault.name, item=str(item.pk), name=item.name, direction=item.direction, **extra)


def job(job_type: str, state: str, seconds: float | None, *, ago: float = 0) -> Job:
    end = timezone.now() - timedelta(seconds=ago)
    return Job.objects.create(type=job_type, state=state, started_at=end - timedelta(seconds=seconds or 1),
                              ended_at=end if seconds is not None else None)


@pytest.fixture
def estate(db):
    """Two vaults, three items in various states, a process server with heartbeats, jobs."""
    a, b = VaultFactory(name="alpha"), VaultFactory(name="beta")
    ps = ProcessServerFactory(vault=a, name="ps-a")
    one = ProtectedItemFactory(vault=a, process_server=ps)
    two = ProtectedItemFactory(vault=a, process_server=ps)
    three = ProtectedItemFactory(vault=b)
    ProtectedItem.objects.filter(pk=one.pk).update(
        protection_state="PROTECTED", health="HEALTHY", rpo_seconds=42, agent_backlog_bytes=1000, ps_pending_bytes=2000,
        storage_waiting_bytes=3000, acked_seq=10, uploaded_seq=9, applied_seq=7)
    ProtectedItem.objects.filter(pk=two.pk).update(protection_state="RESYNC_REQUIRED", health="CRITICAL")
    ProtectedItem.objects.filter(pk=three.pk).update(protection_state="INITIAL_REPLICATION", health="WARNING",
                                                     rpo_seconds=600, direction="RECOVERY_TO_PRIMARY")
    now = timezone.now()
    for seconds, received, uploaded in ((20, 0, 0), (10, 50_000, 20_000), (0, 100_000, 60_000)):
        process_server_data_path_record(server=ps, now=now - timedelta(seconds=seconds), report={
            "started_at": 1_790_000_000.0, "received_bytes": received, "uploaded_bytes": uploaded,
            "items": {str(one.pk): {"received_bytes": received, "uploaded_bytes": uploaded, "pending_bytes": 2000,
                                    "uploaded_seq": 9}}})
    ProcessServer.objects.filter(pk=ps.pk).update(pending_upload_bytes=2000, cache_free_bytes=10**9,
                                                  cache_total_bytes=2 * 10**9, cpu_percent=12.5, memory_percent=40.0,
                                                  last_heartbeat_at=now)
    job("ENABLE_REPLICATION", "SUCCEEDED", 3)
    job("ENABLE_REPLICATION", "SUCCEEDED", 100)
    job("DISABLE_REPLICATION", "FAILED", 20)
    job("RESYNC", "RUNNING", None)
    for item in (one, two, three):
        item.refresh_from_db()
    return {"one": one, "two": two, "three": three, "ps": ps}


def test_metrics_match_the_database(estate):
    one, two, three = estate["one"], estate["two"], estate["three"]
    m = scrape()
    rpo = m["lifeboat_item_rpo_seconds"]
    assert rpo == {item_labels(one): 42, item_labels(three): 600}  # an item without a point has no RPO yet
    backlog = m["lifeboat_item_backlog_bytes"]
    assert [backlog[item_labels(one, stage=s)] for s in ("agent", "process_server", "cache_storage")] == [1000, 2000, 3000]
    assert backlog[item_labels(two, stage="agent")] == 0
    rates = m["lifeboat_item_data_path_bytes_per_second"]
    assert rates[item_labels(one, stage="agent")] == pytest.approx(100_000 / 20)
    assert rates[item_labels(one, stage="process_server")] == pytest.approx(60_000 / 20)
    assert item_labels(two, stage="agent") not in rates  # never measured
    assert m["lifeboat_item_apply_lag_batches"][item_labels(one)] == 3
    assert m["lifeboat_item_apply_lag_bytes"][item_labels(one)] == 5000
    assert m["lifeboat_backlog_bytes"][labels(vault="alpha", stage="process_server")] == 2000
    assert m["lifeboat_backlog_bytes"][labels(vault="beta", stage="agent")] == 0

    health = m["lifeboat_items_by_health"]
    assert {k: v for k, v in health.items() if v} == {
        labels(vault="alpha", health="HEALTHY"): 1, labels(vault="alpha", health="CRITICAL"): 1,
        labels(vault="beta", health="WARNING"): 1}
    assert health[labels(vault="beta", health="CRITICAL")] == 0  # every health, so a series never vanishes
    states = m["lifeboat_items_by_protection_state"]
    assert {k: v for k, v in states.items() if v} == {
        labels(vault="alpha", state="PROTECTED"): 1, labels(vault="alpha", state="RESYNC_REQUIRED"): 1,
        labels(vault="beta", state="INITIAL_REPLICATION"): 1}

    server = labels(vault="alpha", server="ps-a")
    assert m["lifeboat_process_server_ingest_bytes_per_second"][server] == pytest.approx(100_000 / 20)
    assert m["lifeboat_process_server_upload_bytes_per_second"][server] == pytest.approx(60_000 / 20)
    assert m["lifeboat_process_server_pending_upload_bytes"][server] == 2000
    assert m["lifeboat_process_server_cache_free_bytes"][server] == 10**9
    assert m["lifeboat_process_server_cpu_percent"][server] == 12.5
    assert m["lifeboat_process_server_healthy"][server] == 1
    other = labels(vault="beta", server=three.process_server.name)
    assert other not in m["lifeboat_process_server_ingest_bytes_per_second"]  # no heartbeat yet

    jobs = m["lifeboat_jobs"]
    assert jobs == {labels(type="ENABLE_REPLICATION", state="SUCCEEDED"): 2,
                    labels(type="DISABLE_REPLICATION", state="FAILED"): 1, labels(type="RESYNC", state="RUNNING"): 1}
    enable = labels(type="ENABLE_REPLICATION", state="SUCCEEDED")
    assert m["lifeboat_job_duration_seconds_count"][enable] == 2
    assert m["lifeboat_job_duration_seconds_sum"][enable] == pytest.approx(103)
    buckets = m["lifeboat_job_duration_seconds_bucket"]
    assert [buckets[labels(le=le, state="SUCCEEDED", type="ENABLE_REPLICATION")]
            for le in ("1.0", "5.0", "60.0", "300.0", "+Inf")] == [0, 1, 1, 2, 2]
    assert buckets[labels(le="15.0", state="FAILED", type="DISABLE_REPLICATION")] == 0
    assert buckets[labels(le="60.0", state="FAILED", type="DISABLE_REPLICATION")] == 1
    assert not any(dict(k).get("type") == "RESYNC" for k in buckets)  # a running job has no duration yet


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(estate):
    r = Client().get("/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert r.status_code == 200 and r["Content-Type"].startswith("application/openmetrics-text")
    m = samples(openmetrics_families(r.content.decode()))
    assert m["lifeboat_item_rpo_seconds"][item_labels(estate["one"])] == 42
    assert m["lifeboat_job_duration_seconds_count"][labels(type="ENABLE_REPLICATION", state="SUCCEEDED")] == 2


def test_a_scrape_takes_the_same_queries_whatever_the_number_of_items_and_jobs(estate):
    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            scrape()
        return len(ctx.captured_queries)

    few = count()
    vault = estate["one"].vault
    for n in range(12):
        ps = ProcessServerFactory(vault=vault)
        item = ProtectedItemFactory(vault=vault, process_server=ps)
        process_server_data_path_record(server=ps, report={"started_at": 1.0, "received_bytes": n, "uploaded_bytes": n,
                                                           "items": {str(item.pk): {"received_bytes": n,
                                                                                    "uploaded_bytes": n}}})
        job("RESYNC", "SUCCEEDED", n + 1)
        job("TEST_FAILOVER", "CANCELLED", n * 50)
    assert count() == few <= 5


def test_metrics_are_for_this_host_or_a_token_holder(estate, settings):
    assert Client(REMOTE_ADDR="10.20.30.40").get("/metrics").status_code == 403
    assert Client(REMOTE_ADDR="::1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="::ffff:127.0.0.1").get("/metrics").status_code == 200
    assert Client().post("/metrics").status_code == 405

    settings.LIFEBOAT_METRICS_TOKEN = "scrape-me-0123456789"
    remote = Client(REMOTE_ADDR="10.20.30.40")
    r = remote.get("/metrics")
    assert r.status_code == 401 and r["WWW-Authenticate"].startswith("Bearer")
    assert b"LIFEBOAT_METRICS_TOKEN" in r.content
    assert remote.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert Client().get("/metrics").status_code == 401  # with a token set, this host needs it too
    m = scrape(remote, HTTP_AUTHORIZATION="Bearer scrape-me-0123456789")
    assert m["lifeboat_item_rpo_seconds"][item_labels(estate["one"])] == 42
