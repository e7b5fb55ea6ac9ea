"""Discovery of a VMware endpoint's VMs and disks, as a job on the real worker.

Against the simulated site (Lifeboat's embedded default): the machines and disks equal the
site's, changes follow, vanished machines are marked missing and never deleted, one discovery
at a time, a wrong password is a clear failure that never shows the password. Against vcsim:
an inventory of a thousand VMs in a handful of SOAP round trips and a constant number of
database queries.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core.choices import JobState, JobType
from tests.conftest import wait_for
from tests.connectors.vcsim import vcsim_binary, vcsim_factory  # noqa: F401 - fixtures
from tests.factories import ProtectedItemFactory, VaultFactory
from vault.choices import VCenterKind
from vault.connectors.simulated import SimulatedSite
from vault.discovery import connector_for, machines_upsert
from vault.models import DiscoveredDisk, DiscoveredMachine, VCenter
from vault.services import vcenter_create

API = "/api/v1"
USER = "administrator@vsphere.local"
SITE_PASSWORD = "Site-Pa55word-1"
MIB = 1024 * 1024
HOSTS = ("esx-01.sim.local", "esx-02.sim.local")


# --- the simulated site ------------------------------------------------------------------


@pytest.fixture
def site_dir(tmp_path):
    path = tmp_path / "site"
    SimulatedSite.create(
        path, user=USER, password=SITE_PASSWORD, hosts=HOSTS,
        vms=[
            {"name": "web-01", "disks": [64 * MIB], "guest_os": "ubuntu64Guest"},
            {"name": "db-01", "disks": [32 * MIB, 128 * MIB], "guest_os": "windows2019srv_64Guest"},
            {"name": "app-01", "disks": [16 * MIB], "power_state": "poweredOff"},
            {"name": "legacy-01", "disks": [8 * MIB], "host": HOSTS[1]},
        ],
    )
    return path


@pytest.fixture
def site(site_dir):
    """The site as its own administrator sees it (to change it and to read the truth)."""
    connector = SimulatedSite(site_dir, USER, SITE_PASSWORD)
    connector.connect()
    yield connector
    connector.close()


def add_vcenter(vault, site_dir, *, password: str = SITE_PASSWORD) -> VCenter:
    return vcenter_create(vault=vault, name="lab", kind=VCenterKind.SIMULATED, host=str(site_dir),
                          username=USER, password=password)


def start_discovery(api, vcenter: VCenter) -> tuple[dict, str]:
    response = api.post(f"{API}/replicationvCenters/{vcenter.pk}/discover/")
    assert response.status_code == 202, response.content
    job = response.json()
    assert job["type"] == JobType.DISCOVERY and job["target_id"] == str(vcenter.pk)
    assert response["Location"].endswith(f"{API}/replicationJobs/{job['id']}/")
    return job, response["Location"]


def finished(api, location: str) -> dict:
    def terminal():
        job = api.get(location).json()
        return job if job["state"] in JobState.TERMINAL else None

    return wait_for(terminal, timeout=30, message="the discovery job to end")


def discover(api, vcenter: VCenter) -> dict:
    job, location = start_discovery(api, vcenter)
    job = finished(api, location)
    assert job["state"] == JobState.SUCCEEDED, job
    return job


def machine_view(machine: DiscoveredMachine) -> tuple:
    return (machine.instance_uuid, machine.name, machine.power_state, machine.guest_os, machine.host,
            machine.datacenter, machine.cluster,
            tuple((d.key, d.label, d.capacity_bytes, d.backing_file, d.datastore) for d in machine.disks.order_by("key")))


def vm_view(vm) -> tuple:
    return (vm.instance_uuid, vm.name, vm.power_state, vm.guest_os, vm.host, vm.datacenter, vm.cluster,
            tuple(sorted((d.key, d.label, d.capacity_bytes, d.backing_file, d.datastore) for d in vm.disks)))


def assert_machines_match_site(vcenter: VCenter, site: SimulatedSite) -> None:
    present = DiscoveredMachine.objects.filter(vcenter=vcenter, missing=False).prefetch_related("disks")
    assert {machine_view(m) for m in present} == {vm_view(vm) for vm in site.discover().vms}


def by_name(vcenter: VCenter, name: str) -> DiscoveredMachine:
    return DiscoveredMachine.objects.get(vcenter=vcenter, name=name)


@contextmanager
def site_locked(site_dir):
    """Hold the site's inventory lock, as a long change on the site would: readers wait."""
    fd = os.open(os.path.join(site_dir, "site.json.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_discovery_job_finds_the_sites_machines_and_follows_its_changes(api, celery_worker, site_dir, site):
    vault = VaultFactory()
    vcenter = add_vcenter(vault, site_dir)

    job = discover(api, vcenter)

    assert job["result"]["machines_found"] == job["result"]["machines_new"] == 4
    assert job["result"]["disks_new"] == 5
    assert [s["state"] for s in job["steps"]] == ["SUCCEEDED"] * 3
    assert_machines_match_site(vcenter, site)
    assert all(m.source == "vcenter" and m.vault_id == vault.pk for m in DiscoveredMachine.objects.all())
    listed = api.get(f"{API}/replicationProtectableItems/", {"vcenter": vcenter.pk}).json()
    assert sorted(m["name"] for m in listed["results"]) == ["app-01", "db-01", "legacy-01", "web-01"]
    db_01 = next(m for m in listed["results"] if m["name"] == "db-01")
    assert [(d["key"], d["capacity_bytes"]) for d in db_01["disks"]] == [(2000, 32 * MIB), (2001, 128 * MIB)]
    vcenter.refresh_from_db()
    assert vcenter.last_discovery_at is not None and vcenter.last_discovery_error == ""
    first_seen = by_name(vcenter, "legacy-01").last_seen_at

    # legacy-01 gets protected; then the site changes under Lifeboat.
    protected = ProtectedItemFactory(vault=vault, machine=by_name(vcenter, "legacy-01"))
    uuids = {m.name: m.instance_uuid for m in DiscoveredMachine.objects.all()}
    site.power_off(uuids["web-01"])
    site.resize_disk(uuids["db-01"], 2001, 256 * MIB)
    new = site.create_vm(name="new-01", host=HOSTS[0], datastore="datastore1", disk_capacities_bytes=[24 * MIB, 8 * MIB])
    site.destroy_vm(uuids["app-01"])
    site.destroy_vm(uuids["legacy-01"])

    job = discover(api, vcenter)

    assert job["result"] == {
        "machines_found": 3, "machines_new": 1, "machines_updated": 1, "machines_missing": 2,
        "disks_new": 2, "disks_changed": 1, "disks_removed": 0,
    }
    assert_machines_match_site(vcenter, site)
    assert by_name(vcenter, "web-01").power_state == "poweredOff"
    assert by_name(vcenter, "db-01").disks.get(key=2001).capacity_bytes == 256 * MIB
    assert by_name(vcenter, "new-01").instance_uuid == new.instance_uuid
    # The vanished machines stay, marked missing, with their disks; the protected one keeps its item.
    for name in ("app-01", "legacy-01"):
        gone = by_name(vcenter, name)
        assert gone.missing and gone.disks.exists()
    legacy = by_name(vcenter, "legacy-01")
    assert legacy.last_seen_at == first_seen
    assert legacy.protected_items.get().pk == protected.pk
    shown = api.get(f"{API}/replicationProtectableItems/{legacy.pk}/").json()
    assert shown["missing"] is True and shown["protected_item"] == str(protected.pk)
    assert DiscoveredMachine.objects.count() == 5

    # Discovering an unchanged site changes nothing.
    job = discover(api, vcenter)
    assert job["result"]["machines_updated"] == job["result"]["machines_new"] == job["result"]["machines_missing"] == 0
    assert job["result"]["disks_new"] == job["result"]["disks_changed"] == 0


def test_a_second_discovery_while_one_runs_is_refused(api, celery_worker, site_dir, site):
    vcenter = add_vcenter(VaultFactory(), site_dir)
    with site_locked(site_dir):
        job, location = start_discovery(api, vcenter)
        # The worker has claimed the job and waits in its Connect step for the site.
        wait_for(lambda: api.get(location).json()["state"] == JobState.RUNNING, timeout=30,
                 message="the worker to start the discovery job")

        response = api.post(f"{API}/replicationvCenters/{vcenter.pk}/discover/")

        assert response.status_code == 409, response.content
        error = response.json()["error"]
        assert error["code"] == "already_running" and error["job"] == job["id"]
        assert "already running" in error["message"]
    assert finished(api, location)["state"] == JobState.SUCCEEDED
    assert_machines_match_site(vcenter, site)
    # Once it has ended, discovery can run again.
    discover(api, vcenter)


def test_wrong_password_fails_the_job_with_a_clear_sentence_and_never_shows_a_password(api, celery_worker, site_dir):
    wrong = "Wrong-Pa55word-2"
    vcenter = add_vcenter(VaultFactory(), site_dir, password=wrong)

    job, location = start_discovery(api, vcenter)
    job = finished(api, location)

    assert job["state"] == JobState.FAILED
    assert job["error"] == f"Simulated site {site_dir} rejected the user name or password."
    assert [(s["name"], s["state"]) for s in job["steps"]][0] == ("Connect", "FAILED")
    # The job's end is written first; the vCenter's error and the alert follow it.
    shown = wait_for(lambda: (v := api.get(f"{API}/replicationvCenters/{vcenter.pk}/").json())["last_discovery_error"] and v,
                     timeout=10, message="the vCenter to show the discovery error")
    assert shown["last_discovery_error"] == job["error"]
    assert shown["last_discovery_at"] is None
    assert not DiscoveredMachine.objects.exists()
    alerts = wait_for(lambda: api.get(f"{API}/replicationAlerts/", {"vault": vcenter.vault_id}).json()["results"],
                      timeout=10, message="the failed job's alert")
    assert [a["kind"] for a in alerts] == ["job_failed"]
    assert "rejected the user name or password" in alerts[0]["message"]

    # The admin fixes the password; the next discovery works and clears the error.
    fixed = api.patch(f"{API}/replicationvCenters/{vcenter.pk}/", {"password": SITE_PASSWORD}, format="json")
    assert fixed.status_code == 200, fixed.content
    discover(api, vcenter)
    assert api.get(f"{API}/replicationvCenters/{vcenter.pk}/").json()["last_discovery_error"] == ""

    responses = [fixed]
    for url in ("replicationvCenters/", f"replicationvCenters/{vcenter.pk}/", "replicationJobs/", location,
                "replicationAlerts/", "replicationEvents/", "replicationProtectableItems/"):
        responses.append(api.get(url if url.startswith("http") else f"{API}/{url}"))
    for response in responses:
        assert response.status_code == 200, (response.request["PATH_INFO"], response.content)
        text = response.content.decode()
        for secret in (wrong, SITE_PASSWORD, "Pa55word"):
            assert secret not in text, response.request["PATH_INFO"]
        assert "Traceback" not in text and "Unexpected error" not in text


# --- a thousand VMs in vcsim ---------------------------------------------------------------


def vcsim_vms(dump: dict) -> set[tuple]:
    """vcsim's own inventory dump in the shape of ``machine_view``; templates cannot be protected."""
    return {
        (vm["instance_uuid"], vm["name"], vm["power_state"], vm["guest_id"], vm["host"], vm["datacenter"],
         vm["cluster"], tuple(sorted((d["key"], d["label"], d["capacity_bytes"], d["backing_file"], d["datastore"])
                                     for d in vm["disks"])))
        for vm in dump["vms"]
        if not vm["template"]
    }


def _upsert_queries(vcenter: VCenter, vms) -> tuple[int, dict]:
    with CaptureQueriesContext(connection) as ctx:
        summary = machines_upsert(vcenter=vcenter, vms=vms)
    return len(ctx.captured_queries), summary


@pytest.mark.peer
@pytest.mark.django_db
def test_discovery_of_a_thousand_vms_in_vcsim(vcsim_factory):  # noqa: F811 - the imported fixture
    server = vcsim_factory(cluster=5, host=2, standalone_host=0, vm=200)
    expected = vcsim_vms(server.inventory)
    assert len(expected) == 1000

    def endpoint(name: str) -> VCenter:
        # The admin pins the certificate the simulator presents, as for a vCenter with a private CA.
        return vcenter_create(vault=VaultFactory(name=name), name="vcsim", host=server.host, port=server.port,
                              username=server.user, password=server.password, thumbprint=server.thumbprint_sha256)

    big, small = endpoint("big"), endpoint("small")
    connector = connector_for(big)
    connector.connect()
    try:
        inventory = connector.discover()
        round_trips = connector.round_trips  # since connect(), the login included
    finally:
        connector.close()
    assert round_trips <= 10, round_trips

    queries_1000, summary = _upsert_queries(big, inventory.vms)
    assert summary["machines_new"] == 1000 and summary["disks_new"] == sum(len(vm[7]) for vm in expected)
    machines = DiscoveredMachine.objects.filter(vcenter=big).prefetch_related("disks")
    assert {machine_view(m) for m in machines} == expected
    assert DiscoveredDisk.objects.filter(machine__vcenter=big).count() == summary["disks_new"]

    queries_10, summary = _upsert_queries(small, inventory.vms[:10])
    assert summary["machines_new"] == 10
    assert queries_10 == queries_1000, f"10 VMs: {queries_10} queries, 1,000 VMs: {queries_1000}"

    # Rediscovery of the same inventories: nothing changes, and still no query per VM.
    again_1000, summary = _upsert_queries(big, inventory.vms)
    assert summary["machines_updated"] == summary["machines_new"] == summary["disks_changed"] == 0
    again_10, _ = _upsert_queries(small, inventory.vms[:10])
    assert again_10 == again_1000, f"10 VMs: {again_10} queries, 1,000 VMs: {again_1000}"
    assert max(queries_1000, again_1000) <= 12
