"""The recovery API: recovery sites with nested networks, the item's recovery mapping, and the
recovery actions on replicationProtectedItems (202 + job + Location; 409 with the current
state; 400 with a sentence and nothing changed)."""
from __future__ import annotations

import pytest
from django.utils import timezone

from core.models import Job
from recovery_plans.models import RecoveredVm
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from replication.services import protected_item_set_recovery
from tests.conftest import grant_role
from tests.factories import ProtectedItemFactory, RecoveryPointFactory, RecoverySiteFactory, VaultFactory
from vault.models import RecoverySite, VCenter

pytestmark = pytest.mark.django_db
ITEMS = "/api/v1/replicationProtectedItems"


def _item(state=P.PROTECTED, points=2) -> ProtectedItem:
    item = ProtectedItemFactory()
    vc = VCenter.objects.create(vault=item.vault, name="vc", kind="simulated", host="/tmp/none", username="u", password_encrypted="x")
    item.machine.vcenter = vc
    item.machine.save()
    protected_item_set_recovery(item=item, recovery_site=RecoverySiteFactory(vault=item.vault))
    for _ in range(points):
        RecoveryPointFactory(item=item)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=state)
    return ProtectedItem.objects.get(pk=item.pk)


# --- recovery sites -------------------------------------------------------------------------


def test_recovery_site_crud_with_nested_networks(api):
    vault = VaultFactory()
    body = {"vault": vault.pk, "name": "dr", "kind": "simulated", "host": "/srv/dr",
            "networks": [{"name": "prod", "purpose": "RECOVERY"}, {"name": "iso", "purpose": "TEST"}]}
    r = api.post("/api/v1/recoverySites/", body, format="json")
    assert r.status_code == 201, r.content
    site_id = r.data["id"]
    assert sorted((n["name"], n["purpose"]) for n in r.data["networks"]) == [("iso", "TEST"), ("prod", "RECOVERY")]
    assert "password" not in r.data
    assert api.post("/api/v1/recoverySites/", body, format="json").status_code == 409

    r = api.post(f"/api/v1/recoverySites/{site_id}/networks", {"name": "iso-2", "purpose": "TEST"}, format="json")
    assert r.status_code == 201 and r.data["name"] == "iso-2"
    assert api.post(f"/api/v1/recoverySites/{site_id}/networks", {"name": "iso-2", "purpose": "TEST"}, format="json").status_code == 409
    assert len(api.get(f"/api/v1/recoverySites/{site_id}/networks").json()) == 3
    assert api.delete(f"/api/v1/recoverySites/{site_id}/networks/{r.data['id']}").status_code == 204
    iso = RecoverySite.objects.get(pk=site_id).networks.get(name="iso")
    r = api.delete(f"/api/v1/recoverySites/{site_id}/networks/{iso.pk}")
    assert r.status_code == 400 and "last isolated test network" in r.json()["error"]["message"]

    r = api.patch(f"/api/v1/recoverySites/{site_id}/", {"host": "/srv/dr2"}, format="json")
    assert r.status_code == 200 and r.data["host"] == "/srv/dr2"
    assert api.delete(f"/api/v1/recoverySites/{site_id}/").status_code == 204


@pytest.mark.parametrize("body,field", [
    ({"networks": [{"name": "prod", "purpose": "RECOVERY"}]}, "networks"),
    ({"networks": []}, "networks"),
    ({"host": "relative", "networks": [{"name": "a", "purpose": "RECOVERY"}, {"name": "b", "purpose": "TEST"}]}, "host"),
    ({"kind": "vsphere", "host": "vc", "networks": [{"name": "a", "purpose": "RECOVERY"}, {"name": "b", "purpose": "TEST"}]}, "password"),
])
def test_recovery_site_bad_input_is_400_and_nothing_created(api, body, field):
    vault = VaultFactory()
    r = api.post("/api/v1/recoverySites/", {"vault": vault.pk, "name": "dr", "host": "/srv/dr", **body}, format="json")
    assert r.status_code == 400, r.content
    assert field in r.json()["error"]["message"] or field in r.json()["error"].get("fields", {})
    assert not RecoverySite.objects.exists()


def test_site_in_use_is_409(api):
    item = _item()
    r = api.delete(f"/api/v1/recoverySites/{item.recovery_site_id}/")
    assert r.status_code == 409 and item.name in r.json()["error"]["message"]


def test_readers_cannot_change_anything(client, viewer_user):
    from rest_framework.test import APIClient

    item = _item()
    grant_role(viewer_user, item.vault, "READER")
    reader = APIClient()
    reader.force_authenticate(viewer_user)
    assert reader.get("/api/v1/recoverySites/").status_code == 200
    assert reader.post(f"{ITEMS}/{item.pk}/testFailover", {"recoveryPoint": "latest"}, format="json").status_code == 403
    assert reader.delete(f"/api/v1/recoverySites/{item.recovery_site_id}/").status_code == 403
    assert ProtectedItem.objects.get(pk=item.pk).test_failover_state == "NONE"


# --- the item's recovery mapping ------------------------------------------------------------


def test_patch_sets_the_recovery_site_and_networks(api):
    item = _item()
    site = RecoverySiteFactory(vault=item.vault)
    r = api.patch(f"{ITEMS}/{item.pk}/", {"recovery_site": site.pk}, format="json")
    assert r.status_code == 200, r.content
    assert r.data["recovery_site_name"] == site.name
    assert (r.data["recovery_network_name"], r.data["test_network_name"]) == ("recovery-net", "test-net")
    r = api.patch(f"{ITEMS}/{item.pk}/", {"recovery_site": site.pk, "test_network": site.networks.get(purpose="RECOVERY").pk}, format="json")
    assert r.status_code == 400 and "not an isolated test network" in r.json()["error"]["message"]
    assert ProtectedItem.objects.get(pk=item.pk).test_network.purpose == "TEST"


# --- recovery actions -----------------------------------------------------------------------


@pytest.mark.parametrize("action,body,state,tstate,after", [
    ("testFailover", {"recoveryPoint": "latest"}, P.PROTECTED, "NONE", (P.PROTECTED, "IN_PROGRESS")),
    ("testFailoverCleanup", {"comments": "drill passed"}, P.PROTECTED, "SUCCEEDED", (P.PROTECTED, "CLEANING_UP")),
    ("plannedFailover", {}, P.PROTECTED, "NONE", (P.FAILOVER_IN_PROGRESS, "NONE")),
    ("unplannedFailover", {"recoveryPoint": "latest_processed", "shutDownSource": False}, P.PROTECTED, "NONE",
     (P.FAILOVER_IN_PROGRESS, "NONE")),
    ("applyRecoveryPoint", {"recoveryPoint": "latest"}, P.FAILED_OVER, "NONE", (P.FAILED_OVER, "NONE")),
    ("failoverCommit", None, P.FAILED_OVER, "NONE", (P.FAILOVER_COMMITTED, "NONE")),
])
def test_action_is_202_with_the_job_then_409_on_a_second_click(api, action, body, state, tstate, after):
    item = _item(state)
    ProtectedItem.objects.filter(pk=item.pk).update(test_failover_state=tstate)
    if state == P.FAILED_OVER:
        point = item.recovery_points.first()
        RecoveredVm.objects.create(item=item, kind="FAILOVER", site=item.recovery_site, network=item.recovery_network,
                                   vm_id="vm-1", name=item.name, point_id=point.point_id, point_time=point.time,
                                   point_type=point.type)
    r = api.post(f"{ITEMS}/{item.pk}/{action}", body, format="json")
    assert r.status_code == 202, r.content
    assert r["Location"].rstrip("/").endswith(f"/api/v1/replicationJobs/{r.data['id']}")
    assert Job.objects.get(pk=r.data["id"]).target_id == str(item.pk)
    fresh = ProtectedItem.objects.get(pk=item.pk)
    assert (fresh.protection_state, fresh.test_failover_state) == after
    again = api.post(f"{ITEMS}/{item.pk}/{action}", body, format="json")
    assert again.status_code == 409, again.content
    assert again.json()["error"]["current_state"] in after
    assert Job.objects.filter(target_id=str(item.pk)).count() == 1


@pytest.mark.parametrize("action,body,message", [
    ("testFailover", {"recoveryPoint": "newest"}, "recoveryPoint"),
    ("testFailover", {"recoveryPoint": "custom"}, "recoveryPointId"),
    ("testFailover", {"recoveryPoint": "custom", "recoveryPointId": "00000000-0000-0000-0000-000000000000"}, "has no recovery point"),
    ("testFailover", {"recoveryPoint": "latest_app_consistent"}, "no app-consistent recovery point"),
    ("testFailover", {"recoveryPoint": "latest", "network": "recovery-net"}, "isolated test network"),
    ("unplannedFailover", {"recoveryPoint": "latest", "network": "no-such-net"}, "not a network of the recovery site"),
    ("unplannedFailover", {"recoveryPoint": "latest", "shutDownSource": "perhaps"}, "shutDownSource"),
    ("plannedFailover", {"network": "test-net"}, "needs a recovery network"),
    ("testFailoverCleanup", {"comments": "x" * 4001}, "comments"),
])
def test_bad_input_is_400_and_nothing_changes(api, action, body, message):
    item = _item()
    if action == "testFailoverCleanup":
        ProtectedItem.objects.filter(pk=item.pk).update(test_failover_state="SUCCEEDED")
    before = ProtectedItem.objects.values("protection_state", "test_failover_state").get(pk=item.pk)
    r = api.post(f"{ITEMS}/{item.pk}/{action}", body, format="json")
    assert r.status_code == 400, r.content
    assert message in r.json()["error"]["message"]
    assert ProtectedItem.objects.values("protection_state", "test_failover_state").get(pk=item.pk) == before
    assert not Job.objects.filter(target_id=str(item.pk)).exists()


def test_wrong_state_is_409_with_the_current_state(api):
    item = _item(P.RESYNC_REQUIRED)
    r = api.post(f"{ITEMS}/{item.pk}/plannedFailover", {}, format="json")
    assert r.status_code == 409
    assert r.json()["error"]["current_state"] == P.RESYNC_REQUIRED
    r = api.post(f"{ITEMS}/{item.pk}/failoverCommit")
    assert r.status_code == 409 and "failed over" not in r.json()["error"]["current_state"]


def test_item_shows_its_recovered_vms(api):
    item = _item(P.FAILED_OVER)
    point = item.recovery_points.first()
    common = dict(item=item, site=item.recovery_site, point_id=point.point_id, point_time=point.time, point_type=point.type)
    RecoveredVm.objects.create(kind="TEST", network=item.test_network, vm_id="t1", name=f"{item.name}-test",
                               removed_at=timezone.now(), cleanup_notes="drill passed", **common)
    RecoveredVm.objects.create(kind="FAILOVER", network=item.recovery_network, vm_id="f1", name=item.name, power_state="poweredOn",
                               disks=[{"index": 0, "size_bytes": 8 << 20, "digest": "blake3:00", "method": "clone", "location": "/x"}],
                               verified_bytes=8 << 20, **common)
    data = api.get(f"{ITEMS}/{item.pk}/").json()
    assert data["testFailoverVm"] is None
    vm = data["failoverVm"]
    assert (vm["name"], vm["site_name"], vm["network_name"], vm["power_state"], vm["point_type"], vm["disks_verified"]) == (
        item.name, item.recovery_site.name, "recovery-net", "poweredOn", point.type, 1)
    assert [v["kind"] for v in data["recoveredVms"]] == ["FAILOVER", "TEST"]
    assert data["recoveredVms"][1]["cleanup_notes"] == "drill passed"


def test_item_list_query_count_does_not_grow_with_items(api, django_assert_max_num_queries):
    _item()
    with django_assert_max_num_queries(20) as few:
        api.get(f"{ITEMS}/")
    for _ in range(4):
        _item()
    with django_assert_max_num_queries(len(few.captured_queries)):
        r = api.get(f"{ITEMS}/")
    assert r.json()["count"] == 5
