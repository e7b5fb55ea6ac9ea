"""Two clients asking for the same operation at the same moment start exactly one job."""
from __future__ import annotations

import threading

import pytest
from django.db import connection
from rest_framework.test import APIClient

from core.models import Job
from replication.models import ProtectedItem
from tests.factories import DiskFactory, MachineFactory, PolicyFactory, ProcessServerFactory, ProtectedItemFactory, VaultFactory


def _race(admin_user, n: int, call) -> list:
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        client = APIClient()
        client.force_authenticate(admin_user)
        barrier.wait()
        try:
            results[i] = call(client)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("attempt", range(3))
def test_simultaneous_repair_replication_starts_one_job(transactional_db, admin_user, attempt):
    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="RESYNC_REQUIRED")
    results = _race(admin_user, 4, lambda c: c.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication/"))
    codes = sorted(r.status_code for r in results)
    assert codes == [202, 409, 409, 409]
    losers = [r.json() for r in results if r.status_code == 409]
    assert all(body["error"]["code"] == "invalid_state" and body["error"]["current_state"] == "RESYNCING" for body in losers)
    assert Job.objects.filter(target_id=str(item.pk), type="RESYNC").count() == 1
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == "RESYNCING"


def test_simultaneous_enable_of_one_machine_protects_it_once(transactional_db, admin_user):
    vault = VaultFactory()
    machine = MachineFactory(vault=vault)
    DiskFactory(machine=machine)
    policy = PolicyFactory(vault=vault)
    ps = ProcessServerFactory(vault=vault)
    body = {"vault": vault.pk, "machine": machine.pk, "policy": policy.pk, "process_server": ps.pk}
    results = _race(admin_user, 3, lambda c: c.post("/api/v1/replicationProtectedItems/", body, format="json"))
    codes = sorted(r.status_code for r in results)
    assert codes == [202, 409, 409]
    assert ProtectedItem.objects.filter(machine=machine).count() == 1
    assert Job.objects.filter(type="ENABLE_REPLICATION").count() == 1


def test_operation_refused_in_wrong_state_changes_nothing(db, api):
    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="INITIAL_REPLICATION")
    response = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication/")
    assert response.status_code == 409
    assert response.json()["error"]["current_state"] == "INITIAL_REPLICATION"
    assert not Job.objects.exists()


def test_a_protected_item_may_always_be_repaired(db, api):
    """An admin who doubts a replica asks for a repair on a protected item: a resync job."""
    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="PROTECTED")
    response = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication/")
    assert response.status_code == 202
    item.refresh_from_db()
    assert item.protection_state == "RESYNCING"
    assert Job.objects.get().type == "RESYNC"


def test_enable_replication_bad_input(db, api):
    vault, other = VaultFactory(), VaultFactory()
    machine = MachineFactory(vault=other)
    policy = PolicyFactory(vault=vault)
    ps = ProcessServerFactory(vault=vault)
    r = api.post("/api/v1/replicationProtectedItems/", {"vault": vault.pk, "machine": machine.pk, "policy": policy.pk, "process_server": ps.pk}, format="json")
    assert r.status_code == 400 and "same vault" not in r.json()["error"]["message"].lower() or "belong" in r.json()["error"]["message"]
    r = api.post("/api/v1/replicationProtectedItems/", {"vault": vault.pk, "machine": 999999, "policy": policy.pk, "process_server": ps.pk}, format="json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
    r = api.post("/api/v1/replicationProtectedItems/", {"vault": vault.pk, "machine": machine.pk, "policy": policy.failback_policy_id, "process_server": ps.pk}, format="json")
    assert r.status_code == 400
    assert not ProtectedItem.objects.exists() and not Job.objects.exists()
