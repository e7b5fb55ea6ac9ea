"""The data path in bytes and rates, fed by process-server heartbeats (replication/data_path.py).

The heartbeats here are reports as a process server sends them, recorded at chosen moments
so that the expected rates are exact; one goes through the real heartbeat endpoint."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from replication.agents import process_server_token
from replication.data_path import counter_rate, process_server_data_path_record, process_server_rates
from replication.models import DataPathSample, ProtectedItem
from tests.factories import ProcessServerFactory, ProtectedItemFactory, VaultFactory

START = 1_790_000_000.0  # the process server's start time, as its heartbeat says


def report(items: dict, *, started: float = START, **totals) -> dict:
    return {"started_at": started, "items": {str(k): v for k, v in items.items()},
            "received_bytes": totals.get("received", sum(f["received_bytes"] for f in items.values())),
            "uploaded_bytes": totals.get("uploaded", sum(f["uploaded_bytes"] for f in items.values()))}


def figures(received: int, uploaded: int, pending: int, uploaded_seq: int) -> dict:
    return {"acked_seq": uploaded_seq + 1, "uploaded_seq": uploaded_seq, "pending_batches": 1,
            "pending_bytes": pending, "received_bytes": received, "uploaded_bytes": uploaded}


def applied(item, total: int) -> None:
    """What apply passes leave on the item's row: its sealed log bytes applied, ever."""
    ProtectedItem.objects.filter(pk=item.pk).update(applied_log_bytes=total)


def test_counter_rate_counts_a_restarted_counter_from_zero():
    assert counter_rate([]) is None and counter_rate([(0.0, 1.0, 5)]) is None
    assert counter_rate([(0.0, 1.0, 100), (10.0, 1.0, 600)]) == 50.0
    # the server restarted between the samples (another start time): its 300 is all new
    assert counter_rate([(0.0, 1.0, 100), (10.0, 1.0, 600), (20.0, 2.0, 300)]) == (500 + 300) / 20
    # a counter that went down without a new start time began again too
    assert counter_rate([(0.0, 1.0, 900), (5.0, 1.0, 100)]) == 100 / 5


@pytest.mark.django_db
def test_heartbeats_keep_each_items_bytes_and_rates_over_the_window(settings):
    settings.LIFEBOAT_DATA_PATH_RATE_WINDOW = 60
    item = ProtectedItemFactory()
    other = ProtectedItemFactory(vault=item.vault, process_server=item.process_server)
    server = item.process_server
    t0 = timezone.now() - timedelta(seconds=30)

    process_server_data_path_record(server=server, report=report({item.pk: figures(0, 0, 0, 0),
                                                                  other.pk: figures(1000, 1000, 0, 1)}), now=t0)
    item.refresh_from_db()
    assert item.sent_bytes_per_s is None and item.data_path_measured_at == t0  # one sample: no rate yet

    applied(item, 4_000)
    process_server_data_path_record(server=server, report=report({item.pk: figures(10_000, 5_000, 5_000, 3),
                                                                  other.pk: figures(1000, 1000, 0, 1)}),
                                    now=t0 + timedelta(seconds=10))
    applied(item, 24_000)
    process_server_data_path_record(server=server, report=report({item.pk: figures(30_000, 25_000, 5_000, 9),
                                                                  other.pk: figures(1000, 1000, 0, 1)}),
                                    now=t0 + timedelta(seconds=20))
    item.refresh_from_db()
    assert (item.ps_pending_bytes, item.uploaded_seq) == (5_000, 9)
    assert item.sent_bytes_per_s == pytest.approx(30_000 / 20)
    assert item.uploaded_bytes_per_s == pytest.approx(25_000 / 20)
    assert item.applied_bytes_per_s == pytest.approx(24_000 / 20)
    other.refresh_from_db()
    assert other.sent_bytes_per_s == other.uploaded_bytes_per_s == other.applied_bytes_per_s == 0.0
    assert process_server_rates(now=t0 + timedelta(seconds=20))[server.pk] == (
        pytest.approx(30_000 / 20), pytest.approx(25_000 / 20))

    # The server restarts: its counters begin again (another start time); the rate goes on.
    process_server_data_path_record(server=server, report=report({item.pk: figures(2_000, 2_000, 0, 10),
                                                                  other.pk: figures(0, 0, 0, 1)}, started=START + 25),
                                    now=t0 + timedelta(seconds=30))
    item.refresh_from_db()
    assert item.sent_bytes_per_s == pytest.approx((30_000 + 2_000) / 30)
    assert item.ps_pending_bytes == 0

    # Past the window only the window's samples count; past twice the window they are gone.
    applied(item, 24_000)
    process_server_data_path_record(server=server, report=report({item.pk: figures(2_000, 2_000, 0, 10),
                                                                  other.pk: figures(0, 0, 0, 1)}, started=START + 25),
                                    now=t0 + timedelta(seconds=85))
    item.refresh_from_db()
    assert item.sent_bytes_per_s == pytest.approx(0.0)  # samples at 30 s and 85 s: nothing new
    assert item.applied_bytes_per_s == pytest.approx(0.0)
    process_server_data_path_record(server=server, report=report({item.pk: figures(2_000, 2_000, 0, 10)},
                                                                 started=START + 25), now=t0 + timedelta(seconds=150))
    assert min(DataPathSample.objects.filter(server=server).values_list("at", flat=True)) >= t0 + timedelta(seconds=30)


@pytest.mark.django_db
def test_an_item_of_another_server_or_a_report_without_counters_changes_nothing(settings):
    item = ProtectedItemFactory()
    stranger = ProcessServerFactory(vault=item.vault)
    process_server_data_path_record(server=stranger, report=report({item.pk: figures(500, 500, 77, 5)}))
    item.refresh_from_db()
    assert (item.ps_pending_bytes, item.uploaded_seq, item.data_path_measured_at) == (0, 0, None)
    assert not DataPathSample.objects.filter(item=item).exists()
    # An older process server reports no counters: its figures are kept, no sample is.
    process_server_data_path_record(server=item.process_server, report={"items": {str(item.pk): {
        "acked_seq": 5, "uploaded_seq": 4, "pending_batches": 1}}})
    item.refresh_from_db()
    assert item.uploaded_seq == 4 and not DataPathSample.objects.filter(server=item.process_server).exists()


@pytest.mark.django_db
def test_recording_a_heartbeat_takes_the_same_queries_for_3_items_or_30():
    def queries(n: int) -> int:
        vault = VaultFactory()
        server = ProcessServerFactory(vault=vault)
        items = [ProtectedItemFactory(vault=vault, process_server=server) for _ in range(n)]
        for second in (0, 10):  # the second heartbeat also computes rates from the first's samples
            body = report({i.pk: figures(1000 * (second + 1), 500 * second, 10, second) for i in items})
            with CaptureQueriesContext(connection) as ctx:
                process_server_data_path_record(server=server, report=body,
                                                now=timezone.now() - timedelta(seconds=20 - second))
        return len(ctx.captured_queries)

    few = queries(3)
    assert few == queries(30) and few <= 5


@pytest.mark.django_db
def test_the_heartbeat_endpoint_keeps_the_figures_and_computes_rates():
    item = ProtectedItemFactory()
    server = item.process_server
    process_server_data_path_record(server=server, report=report({item.pk: figures(0, 0, 0, 0)}),
                                    now=timezone.now() - timedelta(seconds=20))
    client = APIClient()
    body = {"cpu_percent": 5.0, "pending_upload_bytes": 4096, **report({item.pk: figures(40_000, 36_000, 4096, 7)})}
    before = time.time()
    r = client.post(f"/api/v1/processServers/{server.pk}/heartbeat", body, format="json",
                    HTTP_AUTHORIZATION=f"Bearer {process_server_token(server=server)}")
    assert r.status_code == 200, r.content
    item.refresh_from_db()
    assert (item.ps_pending_bytes, item.uploaded_seq, item.acked_seq) == (4096, 7, 8)
    span = item.data_path_measured_at.timestamp() - (before - 20)
    assert item.sent_bytes_per_s == pytest.approx(40_000 / span, rel=0.05)
    assert item.uploaded_bytes_per_s == pytest.approx(36_000 / span, rel=0.05)
    # A counter that is not a whole number is refused, with the field named.
    bad = dict(body, items={str(item.pk): {"received_bytes": -1}})
    r = client.post(f"/api/v1/processServers/{server.pk}/heartbeat", bad, format="json",
                    HTTP_AUTHORIZATION=f"Bearer {process_server_token(server=server)}")
    assert r.status_code == 400 and "received_bytes" in r.content.decode()
