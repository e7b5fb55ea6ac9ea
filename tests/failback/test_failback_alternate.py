"""Failback to an alternate location end to end on real parts, through the API: a new VM on
another host and datastore of the simulated site (unplanned failover to the returning
replica's latest point, then re-enabling replication onto the new VM), the refusals of a bad
alternate location, and a new VM on another vCenter (vcsim) written over its datastore
interface. Two real process server processes, a real Celery worker, the agents on both
simulated sites; every landing ends in a byte comparison."""
from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from django.test import override_settings

from core.choices import JobState, JobType
from core.models import Job
from failback.models import Failback
from recovery_plans.models import RecoveredVm
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import wait_for
from tests.connectors.vcsim import vcsim_binary, vcsim_factory  # noqa: F401 - fixtures
from tests.e2e.harness import MiB, Site, free_port, process_server, sha256_file
from tests.failback.test_failback_e2e import ITEMS, TOTAL, VMS, Writes, _recovered_shas, _succeeded
from vault import discovery
from vault import services as vault_services

pytestmark = pytest.mark.timeout(300)

HOSTS = ["esx-01.sim.local", "esx-02.sim.local"]
DATASTORES = ("datastore1", "datastore2")


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS, crash_interval=5, datastores=DATASTORES)
    drain = override_settings(LIFEBOAT_FAILOVER_DRAIN_TIMEOUT=120)
    drain.enable()
    yield s
    drain.disable()
    s.close()


@contextmanager
def committed_failover(site: Site, api):
    """app-fb protected to a simulated recovery site, failed over planned and committed, with
    both process servers, the agents on both sites and the apply beat running. Yields the
    item, its machine, the recovered VM and the recovery site's directory."""
    from replication.agent_host import AgentHost
    from replication.process_servers import process_server_config

    recovery_dir = site.tmp / "recovery"
    recovery = vault_services.recovery_site_create(
        vault=site.vault, name="recovery-site", host=str(recovery_dir),
        networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")],
    )
    ps_back = vault_services.process_server_create(vault=site.vault, name="ps-recovery", host="127.0.0.1",
                                                   data_port=free_port(), site="RECOVERY")
    vault_services.master_target_server_create(vault=site.vault, name="mt-01", host="127.0.0.1")
    back_config = process_server_config(server=ps_back, cache_dir=str(site.tmp / "ps-back-cache"))
    back_config["report_interval"] = 1.0
    machine = site.vault.machines.get(name="app-fb")
    (site.tmp / "ps-fwd").mkdir()
    (site.tmp / "ps-back").mkdir()
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp / "ps-fwd"), process_server(back_config, site.tmp / "ps-back"):
        site.start_agents()
        site.start_beat()
        back_agents = AgentHost(str(recovery_dir), scan_interval=0.2, heartbeat_interval=1.0, assignment_interval=0.5)
        back_agents.stop = site._stop
        threading.Thread(target=back_agents.run, daemon=True, name="recovery-agents").start()
        _succeeded(api.post(f"{ITEMS}/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk,
                                          "process_server": site.ps.pk, "recovery_site": recovery.pk}, format="json"))
        item = ProtectedItem.objects.get(machine=machine)
        _succeeded(api.post(f"{ITEMS}/{item.pk}/plannedFailover", {}, format="json"))
        writer.set()
        writer.thread.join(timeout=10)
        _succeeded(api.post(f"{ITEMS}/{item.pk}/failoverCommit"))
        vm = RecoveredVm.objects.get(item=item, kind="FAILOVER", removed_at__isnull=True)
        try:
            yield SimpleNamespace(item=item, machine=machine, vm=vm, recovery_dir=recovery_dir)
        finally:
            for t in back_agents.threads.values():
                t.join(timeout=20)


@contextmanager
def recovered_writes(recovery_dir, seed: int = 11):
    """The business runs in the recovery site: the recovered VM writes until the block ends."""
    from vault.connectors.recovery_sim import _LocalSite
    from vault.connectors.simsite import run_workload

    written = Writes()
    recovered_site = _LocalSite(str(recovery_dir), "", "")
    recovered_site.connect()
    stop = threading.Event()
    thread = threading.Thread(target=run_workload, args=(recovered_site, stop), kwargs={"seed": seed, "on_write": written},
                              daemon=True)
    thread.start()
    try:
        wait_for(lambda: written.bytes >= 256 * 1024, timeout=60, message="the recovered VM writing")
        yield written
    finally:
        stop.set()
        thread.join(timeout=10)


def _image_sha(api, point: RecoveryPoint, index: int) -> str:
    """The point's disk as the API streams it."""
    image = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/{index}/image")
    assert image.status_code == 200, image.content
    return hashlib.sha256(b"".join(image.streaming_content)).hexdigest()


def _site_disk_shas(site: Site, vm_uuid: str) -> dict[int, str]:
    """The VM's disk files on the simulated site, by position in key order."""
    return {i: sha256_file(site.site.disk_path(vm_uuid, d.key))
            for i, d in enumerate(sorted(site.site.get_vm(vm_uuid).disks, key=lambda d: d.key))}


# --- 1. a new VM on another host and datastore of the simulated site ---------------------------


def test_alternate_location_on_the_simulated_site_unplanned_then_reenabled(site, api):
    with committed_failover(site, api) as fo:
        item, machine, vm = fo.item, fo.machine, fo.vm
        original_before = _site_disk_shas(site, machine.instance_uuid)
        original_state = site.site.get_vm(machine.instance_uuid).power_state

        with recovered_writes(fo.recovery_dir) as written:
            # --- reprotect to a new VM: the returning replica starts empty, a full copy.
            body = {"location": "ALTERNATE", "targetName": "app-fb-home", "targetHost": HOSTS[1],
                    "targetDatastore": DATASTORES[1]}
            reprotect = _succeeded(api.post(f"{ITEMS}/{item.pk}/reProtect", body, format="json"), timeout=240)
            failback = Failback.objects.get(item=item)
            assert failback.state == "REPLICATING_BACK", failback.last_error
            assert (failback.location, failback.target_name, failback.target_host, failback.target_datastore,
                    failback.target_network) == ("ALTERNATE", "app-fb-home", HOSTS[1], DATASTORES[1], "VM Network")
            assert failback.target_vm_uuid == ""  # made at the failover, not before
            figures = failback.figures["reprotect"]
            assert figures.get("seeded_bytes", 0) == 0, figures  # nothing to seed from
            assert figures["sent_bytes"] >= TOTAL, figures  # the whole disks went over the wire
            assert reprotect.result["sent_bytes"] == figures["sent_bytes"]
            copied = next(s for s in reprotect.steps if s["name"] == "Apply on-premises")
            assert copied["message"] == "Initial copy complete: 24.0 MiB on 2 disk(s) replicated.", reprotect.steps
            returning = failback.returning_item
            assert returning.direction == Direction.RECOVERY_TO_PRIMARY and returning.protection_state == P.PROTECTED
            wait_for(lambda: RecoveryPoint.objects.filter(item=returning).exists(), timeout=60,
                     message="a recovery point of the returning replication")

            # --- unplanned failover to on-premises, to the returning replica's latest point.
            unplanned = _succeeded(api.post(f"{ITEMS}/{item.pk}/unplannedFailover", {"recoveryPoint": "latest"},
                                            format="json"), timeout=240)
        failback.refresh_from_db()
        assert failback.state == "FAILED_BACK", failback.last_error
        new_uuid = failback.target_vm_uuid
        assert new_uuid and new_uuid != machine.instance_uuid and unplanned.result["vm_uuid"] == new_uuid
        new_vm = site.site.get_vm(new_uuid)
        assert (new_vm.name, new_vm.host, new_vm.power_state) == ("app-fb-home", HOSTS[1], "poweredOn")
        assert {d.datastore for d in new_vm.disks} == {DATASTORES[1]}
        assert site.site.read_state()["vms"][new_uuid]["network"] == "VM Network"
        # The new VM's disk files are the point's images, byte for byte.
        point = RecoveryPoint.objects.get(item=returning, point_id=unplanned.result["point_id"])
        new_shas = _site_disk_shas(site, new_uuid)
        assert new_shas == {i: _image_sha(api, point, i) for i in new_shas}
        assert len(new_shas) == 2
        # The original VM was not touched: not powered on, not a byte changed.
        assert site.site.get_vm(machine.instance_uuid).power_state == original_state
        assert _site_disk_shas(site, machine.instance_uuid) == original_before
        # Unplanned shuts the recovered VM down (as asked by default).
        with vm.site.connector() as recovery:
            assert recovery.get_vm(vm.vm_id).power_state == "poweredOff"

        _succeeded(api.post(f"{ITEMS}/{item.pk}/failoverCommit"))
        failback.refresh_from_db()
        assert failback.state == "COMMITTED"

        # --- re-enable: the new VM is the item's source and sends only what differs from the
        # replica that stayed in the recovery site (what the recovered VM wrote).
        reenable = _succeeded(api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json"), timeout=240)
        failback.refresh_from_db()
        item.refresh_from_db()
        assert failback.state == "COMPLETED", failback.last_error
        assert item.machine.instance_uuid == new_uuid and item.machine.name == "app-fb-home"
        assert (item.protection_state, item.direction) == (P.PROTECTED, Direction.PRIMARY_TO_RECOVERY)
        assert not ProtectedItem.objects.filter(pk=returning.pk).exists()
        sent = failback.figures["reenable"]["sent_bytes"]
        assert failback.figures["reenable"]["compared_bytes"] == TOTAL
        # Sent: the blocks the recovered VM changed up to the point (plus the checksum pass's slack).
        assert 0 < sent <= 2 * written.bytes + 2 * MiB, (failback.figures["reenable"], written.bytes)
        assert sent <= TOTAL // 4
        assert reenable.result["sent_bytes"] == sent
        # A point after the resync holds exactly the new VM's disks (nothing writes to it).
        assert _site_disk_shas(site, new_uuid) == new_shas
        after = wait_for(lambda: RecoveryPoint.objects.filter(item=item, seq__gt=item.applied_seq - 1).order_by("-seq").first(),
                         timeout=90, message="a recovery point after re-enabling")
        assert {i: _image_sha(api, after, i) for i in new_shas} == new_shas
        assert _site_disk_shas(site, machine.instance_uuid) == original_before


# --- 2. a bad alternate location changes nothing ----------------------------------------------


def test_bad_alternate_locations_are_refused_and_change_nothing(site, api):
    with committed_failover(site, api) as fo:
        item, machine = fo.item, fo.machine
        state_before = hashlib.sha256((site.site_dir / "site.json").read_bytes()).hexdigest()
        disks_before = _site_disk_shas(site, machine.instance_uuid)
        jobs_before = Job.objects.count()
        place = {"location": "ALTERNATE", "targetName": "app-fb-home", "targetHost": HOSTS[1],
                 "targetDatastore": DATASTORES[1], "targetNetwork": "VM Network"}
        refusals = [
            ({"targetHost": "esx-09.sim.local"}, "targetHost",
             "sim has no host 'esx-09.sim.local' (it has: esx-01.sim.local, esx-02.sim.local)"),
            ({"targetDatastore": "nfs-01"}, "targetDatastore", "sim has no datastore 'nfs-01' (it has: datastore1, datastore2)"),
            ({"targetNetwork": "prod-net"}, "targetNetwork", "sim has no network 'prod-net' (it has: VM Network)"),
            ({"targetName": "app-fb"}, "targetName", "sim already has a VM named 'app-fb'"),
            ({"targetName": "app\x07fb"}, "targetName", "without / \\ % or control characters"),
            ({"targetName": "app\nfb"}, "targetName", "without / \\ % or control characters"),
            ({"targetName": "a/b"}, "targetName", "without / \\ % or control characters"),
            ({"vcenter": "no-such-vcenter"}, "vcenter", "The vault has no vCenter no-such-vcenter (it has: sim)"),
        ]
        for change, field, said in refusals:
            refused = api.post(f"{ITEMS}/{item.pk}/reProtect", {**place, **change}, format="json")
            assert refused.status_code == 400, (change, refused.content)
            error = refused.json()["error"]
            assert said in error["message"], (change, error)
            assert said in " ".join(error["fields"][field]), (change, error)
        # Nothing changed: no failback, the item still committed, no job, the site as it was.
        assert not Failback.objects.filter(item=item).exists()
        assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILOVER_COMMITTED
        assert Job.objects.count() == jobs_before
        assert hashlib.sha256((site.site_dir / "site.json").read_bytes()).hexdigest() == state_before
        assert _site_disk_shas(site, machine.instance_uuid) == disks_before
        assert sorted(vm.name for vm in site.site.discover().vms) == ["app-fb"]


# --- 3. a new VM on another vCenter (vcsim) -----------------------------------------------------


@pytest.mark.peer
def test_alternate_location_on_another_vcenter(site, api, vcsim_factory):  # noqa: F811 - the fixture
    server = vcsim_factory()
    other = vault_services.vcenter_create(vault=site.vault, name="vc-dr-home", host=server.host, port=server.port,
                                          username=server.user, password=server.password,
                                          thumbprint=server.thumbprint_sha256)
    with committed_failover(site, api) as fo:
        item, machine, vm = fo.item, fo.machine, fo.vm
        original_before = _site_disk_shas(site, machine.instance_uuid)
        with recovered_writes(fo.recovery_dir) as written:
            body = {"location": "ALTERNATE", "vcenter": "vc-dr-home", "targetName": "app-fb-vc",
                    "targetHost": "DC0_H0", "targetDatastore": "LocalDS_0", "targetNetwork": "VM Network"}
            _succeeded(api.post(f"{ITEMS}/{item.pk}/reProtect", body, format="json"), timeout=240)
            failback = Failback.objects.get(item=item)
            assert failback.state == "REPLICATING_BACK", failback.last_error
            assert failback.vcenter_id == other.pk and failback.figures["reprotect"]["sent_bytes"] >= TOTAL
            # Planned: the recovered VM shuts down and every write it made comes home.
            planned = _succeeded(api.post(f"{ITEMS}/{item.pk}/failBack", {"type": "planned"}, format="json"),
                                 timeout=240)
            assert written.bytes > 0
        failback.refresh_from_db()
        assert failback.state == "FAILED_BACK", failback.last_error
        new_uuid = failback.target_vm_uuid
        assert new_uuid and planned.result["vm_uuid"] == new_uuid
        live = server.live_vm(new_uuid)
        assert (live["name"], live["host"], live["power_state"]) == ("app-fb-vc", "DC0_H0", "poweredOn")
        assert {d["datastore"] for d in live["disks"]} == {"LocalDS_0"}
        with vm.site.connector() as recovery:
            assert recovery.get_vm(vm.vm_id).power_state == "poweredOff"
        # The disks downloaded back from the vcsim datastore are the recovered VM's final disks.
        recovered = _recovered_shas(vm)
        with discovery.failback_target_for(other) as target:
            made = target.vm(new_uuid)
            downloaded = {}
            for d in made.disks:
                h = hashlib.sha256()
                for piece in target.disk_source(new_uuid, d.key):
                    h.update(piece)
                downloaded[d.index] = h.hexdigest()
        assert downloaded == recovered and len(downloaded) == 2
        assert _site_disk_shas(site, machine.instance_uuid) == original_before  # the original VM untouched

        _succeeded(api.post(f"{ITEMS}/{item.pk}/failoverCommit"))
        failback.refresh_from_db()
        assert failback.state == "COMMITTED"

        # Re-enabling onto a vSphere VM needs the mobility agent installed in it by hand: the
        # job waits for the agent's registration and says how to install it.
        started = api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json")
        assert started.status_code == 202, started.content
        wait_for(lambda: Job.objects.filter(pk=started.json()["id"], state=JobState.WAITING).exists(), timeout=60,
                 message="the re-enable job waiting for the agent")
        job = api.get(started["Location"]).json()  # what an admin polling the job reads
        assert (job["type"], job["state"]) == (JobType.REENABLE_REPLICATION, "WAITING")
        said = job["waiting_for"]
        assert said.startswith("Waiting for the mobility agent to register. Install it on the VM: python -m mobility "
                               "register --config-url "), job
        assert f"--instance-uuid {new_uuid}" in said and said.endswith("&& python -m mobility run"), said
        step = next(s for s in job["steps"] if s["name"] == "Install the mobility agent")
        assert (step["state"], step["message"]) == ("WAITING", said)
        item.refresh_from_db()
        assert item.machine.instance_uuid == new_uuid and item.machine.vcenter_id == other.pk
