"""Deleting an item while a process server's heartbeat adds a data-path sample for it.

The delete gathers and removes the item's samples, then removes the item. A sample committed
between the two used to fail the delete at commit (its foreign key still named the item):
disabling replication or re-enabling after a failback failed now and then. The delete locks
the item's row first, so the late sample waits and is the one refused; a heartbeat that meets
that keeps the samples of the other items. The moment is chosen by running the other
connection's commit right after the delete has removed the samples.

A monitoring sweep that read the item before the delete committed raises its alerts in bulk;
the deleted item's alert fails that insert at commit, and the sweep then raises the others
one by one, dropping the alert whose item is gone.
"""
from __future__ import annotations

import threading

import psycopg2
import pytest
from django.db import connection
from django.db.models import QuerySet
from django.utils import timezone

from replication.data_path import process_server_data_path_record
from replication.models import DataPathSample, ProtectedItem
from replication.services import protected_item_delete
from tests.factories import ProtectedItemFactory


def _other_connection():
    params = connection.get_connection_params()
    return psycopg2.connect(**{k: v for k, v in params.items() if k in ("dbname", "user", "host", "port", "password")})


@pytest.mark.django_db(transaction=True)
def test_a_sample_committed_during_the_delete_waits_and_is_refused(monkeypatch):
    item = ProtectedItemFactory()
    other = _other_connection()
    cur = other.cursor()
    cur.execute(
        f"INSERT INTO {DataPathSample._meta.db_table} (server_id, item_id, at, started_at, received_bytes, uploaded_bytes) "
        "VALUES (%s, %s, now(), 1.0, 10, 10)", [item.process_server_id, str(item.pk)])
    outcome: dict = {}

    def commit():
        try:
            other.commit()
            outcome["late sample"] = "committed"
        except psycopg2.IntegrityError:
            outcome["late sample"] = "refused"

    real_raw_delete = QuerySet._raw_delete
    committer = threading.Thread(target=commit)

    def raw_delete(qs, using):
        count = real_raw_delete(qs, using)
        if qs.model is DataPathSample and not committer.is_alive() and "late sample" not in outcome:
            committer.start()  # the heartbeat commits its sample now, between the two deletes
            committer.join(timeout=1.0)
        return count

    monkeypatch.setattr(QuerySet, "_raw_delete", raw_delete)
    protected_item_delete(item_id=item.pk)  # no IntegrityError here
    committer.join(timeout=10)
    other.close()
    assert outcome == {"late sample": "refused"}
    assert not ProtectedItem.objects.filter(pk=item.pk).exists()
    assert not DataPathSample.objects.filter(item_id=item.pk).exists()


def _delete_and_close(item_id) -> None:
    try:
        protected_item_delete(item_id=item_id)
    finally:
        connection.close()  # this thread's own connection


@pytest.mark.django_db(transaction=True)
def test_a_heartbeat_that_meets_a_deleted_item_keeps_the_other_samples(monkeypatch):
    gone = ProtectedItemFactory()
    kept = ProtectedItemFactory(vault=gone.vault, policy=gone.policy, process_server=gone.process_server)
    server = gone.process_server
    report = {"started_at": 1.0, "received_bytes": 20, "uploaded_bytes": 20,
              "items": {str(i.pk): {"received_bytes": 10, "uploaded_bytes": 10, "pending_bytes": 0, "uploaded_seq": 3}
                        for i in (gone, kept)}}
    real_bulk_create = DataPathSample.objects.bulk_create.__func__
    calls = []

    def bulk_create(manager, objs, *args, **kwargs):
        if manager.model is DataPathSample:
            calls.append(len(objs))
            if len(calls) == 1:  # the item is deleted (and committed) after the heartbeat read it
                deleter = threading.Thread(target=_delete_and_close, args=(gone.pk,))
                deleter.start()
                deleter.join(timeout=10)
        return real_bulk_create(manager, objs, *args, **kwargs)

    monkeypatch.setattr(type(DataPathSample.objects), "bulk_create", bulk_create)
    process_server_data_path_record(server=server, report=report, now=timezone.now())
    assert calls == [3, 2]  # the server's totals and two items, then without the deleted one
    assert set(DataPathSample.objects.values_list("item_id", flat=True)) == {None, kept.pk}


@pytest.mark.django_db(transaction=True)
def test_a_monitoring_sweep_that_meets_a_deleted_item_raises_the_other_alerts(monkeypatch):
    """Both items are past their RPO threshold; one is deleted (and committed) after the sweep
    read it. Its alert is dropped; the sweep ends and raises the other's alert."""
    from replication import monitoring
    from vault.models import Alert, Event

    t0 = timezone.now()
    gone = ProtectedItemFactory(protection_state="PROTECTED", agent_last_heartbeat_at=t0,
                                last_recovery_point_at=t0 - timezone.timedelta(hours=3))
    kept = ProtectedItemFactory(vault=gone.vault, policy=gone.policy, process_server=gone.process_server,
                                protection_state="PROTECTED", agent_last_heartbeat_at=t0,
                                last_recovery_point_at=t0 - timezone.timedelta(hours=3))
    real_items = monitoring._monitored_items

    def items_then_delete():
        items = real_items()
        deleter = threading.Thread(target=_delete_and_close, args=(gone.pk,))
        deleter.start()
        deleter.join(timeout=10)
        return items

    monkeypatch.setattr(monitoring, "_monitored_items", items_then_delete)
    summary = monitoring.items_monitor(now=t0)
    assert summary["items"] == 2 and summary["alerts_raised"] == 1
    assert not ProtectedItem.objects.filter(pk=gone.pk).exists()
    assert list(Alert.objects.values_list("key", "protected_item_id")) == [(f"rpo:{kept.pk}", kept.pk)]
    assert list(Event.objects.filter(kind__startswith="rpo").values_list("protected_item_id", flat=True)) == [kept.pk]
