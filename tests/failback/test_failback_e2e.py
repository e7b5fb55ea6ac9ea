"""Failback end to end on real parts: protect, fail over, let the recovered VM write, reprotect
(to the original VM: only what differs is sent), fail back planned, commit, re-enable
replication (again only what differs) — through the API, with two real process server
processes (one on each side), a real Celery worker, the agents on both simulated sites, and
a byte comparison at every landing."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from django.test import override_settings

from core.choices import JobState
from core.models import Job
from failback.models import Failback
from recovery_plans.models import RecoveredVm
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import wait_for
from tests.e2e.harness import MiB, Site, free_port, process_server, sha256_file
from vault import services as vault_services

pytestmark = pytest.mark.timeout(900)

ITEMS = "/api/v1/replicationProtectedItems"
VMS = [{
    "name": "app-fb", "disks": [16 * MiB, 8 * MiB],
    "workload": {"rate_bytes_per_s": 256 * 1024, "write_size": 16 * 1024, "pattern": "hotspot"},
}]
TOTAL = 24 * MiB


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS, crash_interval=5)
    drain = override_settings(LIFEBOAT_FAILOVER_DRAIN_TIMEOUT=120)
    drain.enable()
    yield s
    drain.disable()
    s.close()


def _job(job_id, timeout=240):
    job = wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=timeout,
                   message=f"job {job_id}")
    return job


def _succeeded(response, timeout=240) -> Job:
    assert response.status_code == 202, response.content
    job = _job(response.json()["id"], timeout=timeout)
    assert job.state == JobState.SUCCEEDED, f"{job.type}: {job.error}"
    return job


def _file_shas(paths: dict[int, str]) -> dict[int, str]:
    return {k: sha256_file(p) for k, p in paths.items()}


def _recovered_shas(vm: RecoveredVm) -> dict[int, str]:
    out = {}
    with vm.site.connector() as connector:
        for disk in connector.get_vm(vm.vm_id).disks:
            h = hashlib.sha256()
            for piece in connector.read_disk(vm.vm_id, disk.index):
                h.update(piece)
            out[disk.index] = h.hexdigest()
    return out


class Writes:
    """What a workload wrote, as 4 KiB blocks per (vm, disk): the data that changed."""

    def __init__(self) -> None:
        self.blocks: set[tuple[str, int, int]] = set()
        self.lock = threading.Lock()

    def __call__(self, vm: str, disk: int, offset: int, data: bytes) -> None:
        with self.lock:
            for block in range(offset // 4096, (offset + len(data) + 4095) // 4096):
                self.blocks.add((vm, disk, block))

    @property
    def bytes(self) -> int:
        return len(self.blocks) * 4096


def test_round_trip_original_location(site, api):
    from replication.agent_host import AgentHost
    from replication.process_servers import process_server_config
    from vault.connectors.recovery_sim import _LocalSite
    from vault.connectors.simsite import run_workload

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

        # --- protect, fail over planned, commit.
        _succeeded(api.post(f"{ITEMS}/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk,
                                          "process_server": site.ps.pk, "recovery_site": recovery.pk}, format="json"))
        item = ProtectedItem.objects.get(machine=machine)
        # Nothing to reprotect before a committed failover.
        refused = api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json")
        assert refused.status_code == 409, refused.content
        _succeeded(api.post(f"{ITEMS}/{item.pk}/plannedFailover", {}, format="json"))
        writer.set()
        writer.thread.join(timeout=10)
        _succeeded(api.post(f"{ITEMS}/{item.pk}/failoverCommit"))
        vm = RecoveredVm.objects.get(item=item, kind="FAILOVER", removed_at__isnull=True)
        onprem = {d.index: site.site.disk_path(machine.instance_uuid, d.source_disk_key) for d in item.replica_disks.all()}
        assert _recovered_shas(vm) == _file_shas(onprem)  # planned: nothing lost on the way out

        # --- the business runs in the recovery site: the recovered VM writes.
        written = Writes()
        recovered_site = _LocalSite(str(recovery_dir), "", "")
        recovered_site.connect()
        stop_recovered = threading.Event()
        recovered_writer = threading.Thread(target=run_workload, args=(recovered_site, stop_recovered),
                                            kwargs={"seed": 11, "on_write": written}, daemon=True)
        recovered_writer.start()
        wait_for(lambda: written.bytes >= 256 * 1024, timeout=60, message="the recovered VM writing")

        # --- bad requests change nothing.
        bad = api.post(f"{ITEMS}/{item.pk}/reProtect", {"location": "SOMEWHERE"}, format="json")
        assert bad.status_code == 400
        bad = api.post(f"{ITEMS}/{item.pk}/reProtect", {"location": "ALTERNATE", "targetHost": "no-such-host"}, format="json")
        assert bad.status_code == 400 and "no-such-host" in bad.content.decode()
        assert not Failback.objects.filter(item=item).exists()
        assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILOVER_COMMITTED

        # --- reprotect to the original VM: seeded from its disks, only what differs is sent.
        reprotect = _succeeded(api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json"), timeout=300)
        changed_by_then = written.bytes
        failback = Failback.objects.get(item=item)
        assert failback.state == "REPLICATING_BACK", failback.last_error
        returning = failback.returning_item
        assert returning.direction == Direction.RECOVERY_TO_PRIMARY and returning.protection_state == P.PROTECTED
        assert returning.process_server_id == ps_back.pk and returning.machine.instance_uuid == vm.vm_id
        figures = failback.figures["reprotect"]
        assert figures["compared_bytes"] == TOTAL and figures["seeded_bytes"] > 0
        # Sent: the blocks the recovered VM changed (plus what it wrote while the pass ran).
        assert 0 < figures["sent_bytes"] <= 2 * changed_by_then + 2 * MiB, (figures, changed_by_then)
        assert reprotect.result["sent_bytes"] == figures["sent_bytes"]
        shown = api.get(f"{ITEMS}/{returning.pk}/").json()
        assert shown["direction"] == "RECOVERY_TO_PRIMARY" and shown["failback"]["item"] == str(item.pk)
        wait_for(lambda: RecoveryPoint.objects.filter(item=returning).exists(), timeout=60,
                 message="a recovery point of the returning replication")
        # A returning replication is not failed over to a recovery site, nor disabled on its own.
        assert api.post(f"{ITEMS}/{returning.pk}/testFailover", {}, format="json").status_code == 400
        assert api.delete(f"{ITEMS}/{returning.pk}/").status_code == 400

        # --- fail over to on-premises, planned, while the recovered VM writes: nothing lost.
        _succeeded(api.post(f"{ITEMS}/{item.pk}/plannedFailover", {}, format="json"), timeout=300)
        stop_recovered.set()
        recovered_writer.join(timeout=10)
        failback.refresh_from_db()
        assert failback.state == "FAILED_BACK"
        assert recovered_site.get_vm(vm.vm_id).power_state == "poweredOff"
        assert site.site.get_vm(machine.instance_uuid).power_state == "poweredOn"
        # Every byte written in the recovery site is on-premises.
        assert _file_shas(onprem) == _recovered_shas(vm)

        _succeeded(api.post(f"{ITEMS}/{item.pk}/failoverCommit"))
        failback.refresh_from_db()
        assert failback.state == "COMMITTED"

        # --- re-enable: the on-premises VM replicates to the recovery site again, deltas only.
        site.site.power_off(machine.instance_uuid)  # still while compared, so the byte comparison below holds
        before = _file_shas(onprem)
        reenable = _succeeded(api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json"), timeout=300)
        failback.refresh_from_db()
        item.refresh_from_db()
        assert failback.state == "COMPLETED"
        assert (item.protection_state, item.direction) == (P.PROTECTED, Direction.PRIMARY_TO_RECOVERY)
        assert not ProtectedItem.objects.filter(pk=returning.pk).exists()
        vm.refresh_from_db()
        assert vm.removed_at is not None
        sent_back = failback.figures["reenable"]["sent_bytes"]
        assert sent_back <= 2 * written.bytes + 2 * MiB, (sent_back, written.bytes)
        assert reenable.result["sent_bytes"] == sent_back
        # The history stays: the item's jobs from protection to re-enable.
        types = set(Job.objects.filter(target_id=str(item.pk)).values_list("type", flat=True))
        assert {"ENABLE_REPLICATION", "PLANNED_FAILOVER", "REPROTECT", "FAILBACK", "REENABLE_REPLICATION"} <= types

        # The replica in the recovery site equals the on-premises VM again: a point after the
        # resync holds exactly its bytes.
        point = wait_for(lambda: RecoveryPoint.objects.filter(item=item, seq__gt=item.applied_seq - 1).order_by("-seq").first(),
                         timeout=90, message="a recovery point after re-enabling")
        for index, sha in before.items():
            image = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/{index}/image")
            assert image.status_code == 200
            assert hashlib.sha256(b"".join(image.streaming_content)).hexdigest() == sha, f"disk {index}"
        assert Path(onprem[0]).exists()
