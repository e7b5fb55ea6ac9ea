"""Two clients asking for the same operation at the same moment start exactly one job."""
from __future__ import annotations

import threading

import pytest
from django.db import connection
from rest_framework.test import APIClient

from core.models import Job
from replication.models import ProtectedItem
from tests.conftest import wait_for
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


# --- the apply lease: one writer per item ------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

from django.utils import timezone  # noqa: E402

from replication.lease import ApplyLease, LeaseLost  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Each process takes the item's lease as often as it can; while it holds it, it owns a marker
# file (O_EXCL: a second holder finds the file and counts an overlap), checks the lease as a
# writer does, then gives both back.
RACER = """
import os, sys, time, django
django.setup()
from django.db import connection
from replication.lease import ApplyLease
item_id, marker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = overlaps = 0
while held < rounds:
    lease = ApplyLease(item_id, seconds=30)
    if not lease.take():
        continue
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        overlaps += 1
    else:
        os.close(fd)
        time.sleep(0.002)
        lease.check()
        os.unlink(marker)
    lease.release()
    held += 1
print(held, overlaps)
connection.close()
"""


def _subprocess_env() -> dict:
    db = connection.settings_dict
    url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "lifeboat.settings"}


def test_two_worker_processes_racing_never_hold_one_items_lease_at_once(transactional_db, tmp_path):
    item = ProtectedItemFactory()
    marker = tmp_path / "holder"
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(item.pk), str(marker), "150"], cwd=ROOT, env=_subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for proc in racers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(tuple(int(v) for v in out.split()))
    assert results == [(150, 0), (150, 0)]
    assert ProtectedItem.objects.get(pk=item.pk).apply_lease_until is None


def test_a_holder_whose_lease_ran_out_writes_nothing_more(transactional_db):
    item = ProtectedItemFactory()
    stalled = ApplyLease(item.pk, renew=False)
    assert stalled.take()
    # The holder stalls (a frozen worker) past the lease's end; another worker takes it.
    ProtectedItem.objects.filter(pk=item.pk).update(apply_lease_until=timezone.now() - timedelta(seconds=1))
    other = ApplyLease(item.pk)
    assert other.take()
    with pytest.raises(LeaseLost) as err:
        stalled.check()
    assert "nothing more was written" in err.value.message
    stalled.release()  # does not release the new holder's lease
    assert ProtectedItem.objects.get(pk=item.pk).apply_lease_owner == other.token
    other.check()
    other.release()
    assert ProtectedItem.objects.get(pk=item.pk).apply_lease_owner == ""


def test_a_held_lease_is_renewed_while_the_pass_runs(transactional_db):
    item = ProtectedItemFactory()
    lease = ApplyLease(item.pk, seconds=3)
    assert lease.take()
    first_end = ProtectedItem.objects.get(pk=item.pk).apply_lease_until
    wait_for(lambda: ProtectedItem.objects.get(pk=item.pk).apply_lease_until > first_end, timeout=20,
             message="the renewal thread to push the lease's end on")
    lease.check()
    lease.release()
