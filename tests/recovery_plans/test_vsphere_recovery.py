"""Recovery onto a vSphere recovery site through the REST API alone: a real worker, process
server, agent and simulated source site replicate a VM; vcsim (a real vCenter simulator, its
inventory as vcsim makes it) is the recovery site. The recovered disks are downloaded back
from vcsim's datastore and compared byte for byte with the recovery point."""
from __future__ import annotations

import hashlib

import pytest

from core.choices import JobState
from core.models import Job
from recovery_plans.models import RecoveredVm
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import wait_for
from tests.connectors.vcsim import vcsim, vcsim_binary  # noqa: F401 - fixtures
from tests.e2e.harness import MiB, Site, process_server

pytestmark = [pytest.mark.timeout(600), pytest.mark.peer]

ITEMS = "/api/v1/replicationProtectedItems"
VMS = [{"name": "api-e2e", "disks": [4 * MiB, 2 * MiB],
        "workload": {"rate_bytes_per_s": 256 * 1024, "write_size": 16 * 1024, "pattern": "uniform"}}]


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS)
    yield s
    s.close()


def _job(job_id, timeout=240) -> Job:
    return wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=timeout,
                    message=f"job {job_id}")


def _point_sha(api, point: RecoveryPoint, index: int) -> str:
    body = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/{index}/image")
    assert body.status_code == 200
    return hashlib.sha256(b"".join(body.streaming_content)).hexdigest()


def _site_sha(vm: RecoveredVm, index: int) -> str:
    h = hashlib.sha256()
    with vm.site.connector() as connector:  # downloads from the datastore over HTTP
        for piece in connector.read_disk(vm.vm_id, index):
            h.update(piece)
    return h.hexdigest()


def test_drill_and_failover_onto_vsphere_through_the_api(site, api, vcsim):
    r = api.post("/api/v1/recoverySites/", {
        "vault": site.vault.pk, "name": "dr-vcenter", "kind": "vsphere", "host": vcsim.host, "port": vcsim.port,
        "username": vcsim.user, "password": vcsim.password, "thumbprint": vcsim.thumbprint_sha256,
        "datacenter": "DC0", "datastore": "LocalDS_0", "placement": "DC0_C0",
        "networks": [{"name": "VM Network", "purpose": "RECOVERY"}, {"name": "DC0_DVPG0", "purpose": "TEST"}],
    }, format="json")
    assert r.status_code == 201, r.content
    recovery_site = r.data["id"]
    assert "password" not in r.data

    machine = site.vault.machines.get(name="api-e2e")
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        r = api.post(f"{ITEMS}/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk,
                                   "process_server": site.ps.pk, "recovery_site": recovery_site}, format="json")
        assert r.status_code == 202, r.content
        assert _job(r.data["id"]).state == JobState.SUCCEEDED
        item = ProtectedItem.objects.get(machine=machine)
        wait_for(lambda: RecoveryPoint.objects.filter(item=item).count() >= 2, timeout=60, message="recovery points")

        # A drill on the test port group, from the latest point.
        r = api.post(f"{ITEMS}/{item.pk}/testFailover", {"recoveryPoint": "latest"}, format="json")
        assert r.status_code == 202 and r["Location"].endswith(f"/{r.data['id']}/"), r.content
        drill = _job(r.data["id"])
        assert drill.state == JobState.SUCCEEDED, drill.error
        body = api.get(f"{ITEMS}/{item.pk}/").json()
        test_vm = body["testFailoverVm"]
        assert (test_vm["name"], test_vm["network_name"], test_vm["power_state"]) == ("api-e2e-test", "DC0_DVPG0", "poweredOn")
        assert test_vm["disks_verified"] == 2
        vm = RecoveredVm.objects.get(pk=test_vm["id"])
        point = RecoveryPoint.objects.get(item=item, point_id=vm.point_id)
        for index in (0, 1):
            assert _site_sha(vm, index) == _point_sha(api, point, index)
        assert vcsim.live_vm(vm.vm_id)["power_state"] == "poweredOn"

        r = api.post(f"{ITEMS}/{item.pk}/testFailoverCleanup", {"comments": "drill on vSphere passed"}, format="json")
        assert _job(r.data["id"]).state == JobState.SUCCEEDED
        assert api.get(f"{ITEMS}/{item.pk}/").json()["testFailoverVm"] is None

        # An unplanned failover (the source is left alone) onto the recovery port group, then commit.
        writer.set()
        writer.thread.join(timeout=10)
        r = api.post(f"{ITEMS}/{item.pk}/unplannedFailover", {"recoveryPoint": "latest", "shutDownSource": False},
                     format="json")
        assert r.status_code == 202, r.content
        failover = _job(r.data["id"])
        assert failover.state == JobState.SUCCEEDED, failover.error
        vm = RecoveredVm.objects.get(item=item, kind="FAILOVER", removed_at__isnull=True)
        assert (vm.network.name, vm.power_state) == ("VM Network", "poweredOn")
        point = RecoveryPoint.objects.get(item=item, point_id=vm.point_id)
        for index in (0, 1):
            assert _site_sha(vm, index) == _point_sha(api, point, index)
        r = api.post(f"{ITEMS}/{item.pk}/failoverCommit")
        assert _job(r.data["id"]).state == JobState.SUCCEEDED
        item.refresh_from_db()
        assert item.protection_state == "FAILOVER_COMMITTED"
        assert list(RecoveryPoint.objects.filter(item=item).values_list("point_id", flat=True)) == [vm.point_id]
