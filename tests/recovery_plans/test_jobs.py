"""Recovery end to end on real parts: a real Celery worker, a real process server process, the
simulated VMware site writing data through its real agent, and the simulated recovery site.
Every recovery ends in a byte comparison: the recovered VM's disks against the source."""
from __future__ import annotations

import hashlib

import pytest
from django.test import override_settings

from core.choices import JobState
from core.models import Job
from recovery_plans.models import RecoveredVm
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import bookmarked_point, wait_for
from tests.e2e.harness import MiB, Site, process_server, sha256_file
from vault import services as vault_services

pytestmark = pytest.mark.timeout(900)

ITEMS = "/api/v1/replicationProtectedItems"
VMS = [{
    "name": "app-e2e", "disks": [8 * MiB, 4 * MiB],
    "workload": {"rate_bytes_per_s": MiB, "write_size": 32 * 1024, "pattern": "hotspot"},
}]


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS)
    # A planned failover that cannot drain fails in a minute here, not ten.
    drain = override_settings(LIFEBOAT_FAILOVER_DRAIN_TIMEOUT=120)
    drain.enable()
    yield s
    drain.disable()
    s.close()


def _job(job_id, timeout=180):
    return wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=timeout, message=f"job {job_id}")


def _source_shas(site: Site, item: ProtectedItem) -> dict[int, str]:
    return {d.index: sha256_file(site.site.disk_path(item.machine.instance_uuid, d.source_disk_key)) for d in item.replica_disks.all()}


def _vm_shas(vm: RecoveredVm) -> dict[int, str]:
    out = {}
    with vm.site.connector() as connector:
        for disk in connector.get_vm(vm.vm_id).disks:
            h = hashlib.sha256()
            for piece in connector.read_disk(vm.vm_id, disk.index):
                h.update(piece)
            out[disk.index] = h.hexdigest()
    return out


def _app_point(site: Site, item: ProtectedItem, writer):
    """Pause the writer, note the source's bytes, cut an app-consistent point there."""
    from replication.scheduling import protected_item_app_consistent_snapshot

    writer.set()
    writer.thread.join(timeout=10)
    shas = _source_shas(site, item)
    bookmark = protected_item_app_consistent_snapshot(item=ProtectedItem.objects.get(pk=item.pk))
    point = bookmarked_point(item, bookmark, timeout=90, message="app-consistent point")
    assert point.type == "app_consistent"
    return point, shas, site.start_workload()


def test_drill_then_planned_failover_change_point_and_commit(site, api):
    from replication.agents import agent_assignment
    from replication.engine import applier_for, item_apply
    from replication.models import MobilityAgent

    recovery = vault_services.recovery_site_create(
        vault=site.vault, name="recovery-site", host=str(site.tmp / "recovery"),
        networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")],
    )
    machine = site.vault.machines.get(name="app-e2e")
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        r = api.post(f"{ITEMS}/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk,
                                   "process_server": site.ps.pk, "recovery_site": recovery.pk}, format="json")
        assert r.status_code == 202, r.content
        assert _job(r.data["id"]).state == JobState.SUCCEEDED
        item = ProtectedItem.objects.get(machine=machine)
        assert (item.recovery_network.name, item.test_network.name) == ("recovery-net", "test-net")

        # --- a drill that fails: a VM of the test VM's name is already at the recovery site.
        first_point, first_shas, writer = _app_point(site, item, writer)
        with recovery.connector() as connector:
            from replication.dataplane.recovery import recovery_disks
            from replication.engine import applier_for

            blocker = connector.create_vm(name="app-e2e-test", network="test-net",
                                          disks=recovery_disks(applier_for(item), first_point.point_id))
        r = api.post(f"{ITEMS}/{item.pk}/testFailover", {"recoveryPoint": "custom", "recoveryPointId": str(first_point.pk)}, format="json")
        failed = _job(r.data["id"])
        assert failed.state == JobState.FAILED
        assert "already exists" in failed.error and "No test VM was left" in failed.error
        item.refresh_from_db()
        assert item.test_failover_state == "NONE" and "Test failover failed" in item.last_error
        with recovery.connector() as connector:
            connector.destroy_vm(blocker.vm_id)

        # --- the drill: the test VM holds the chosen point's bytes; replication goes on.
        r = api.post(f"{ITEMS}/{item.pk}/testFailover", {"recoveryPoint": "custom", "recoveryPointId": str(first_point.pk)}, format="json")
        assert r.status_code == 202, r.content
        again = api.post(f"{ITEMS}/{item.pk}/testFailover", {"recoveryPoint": "latest"}, format="json")
        assert again.status_code == 409 and again.json()["error"]["current_state"] in ("IN_PROGRESS", "SUCCEEDED")
        drill = _job(r.data["id"])
        assert drill.state == JobState.SUCCEEDED, drill.error
        assert [s["state"] for s in drill.steps] == ["SUCCEEDED"] * 3
        assert drill.result["message"] == "2 disks verified, 12.0 MiB"
        test_vm = RecoveredVm.objects.get(item=item, kind="TEST", removed_at__isnull=True)
        assert (test_vm.name, test_vm.network.name, test_vm.power_state) == ("app-e2e-test", "test-net", "poweredOn")
        assert test_vm.point_id == first_point.point_id and test_vm.verified_bytes == 12 * MiB
        assert _vm_shas(test_vm) == first_shas
        item.refresh_from_db()
        assert (item.protection_state, item.test_failover_state) == (P.PROTECTED, "SUCCEEDED")
        newest = RecoveryPoint.objects.filter(item=item).order_by("-seq").first()
        wait_for(lambda: RecoveryPoint.objects.filter(item=item, seq__gt=newest.seq).exists(), timeout=60,
                 message="replication going on during the drill")

        r = api.post(f"{ITEMS}/{item.pk}/testFailoverCleanup", {"comments": "Drill passed: app answered."}, format="json")
        assert r.status_code == 202
        assert _job(r.data["id"]).state == JobState.SUCCEEDED
        test_vm.refresh_from_db()
        assert test_vm.removed_at is not None and test_vm.cleanup_notes == "Drill passed: app answered."
        with recovery.connector() as connector:
            assert test_vm.vm_id not in {v.vm_id for v in connector.list_vms()}
        item.refresh_from_db()
        assert item.test_failover_state == "NONE" and item.last_error == ""

        # --- planned failover while the VM writes: no write is lost.
        r = api.post(f"{ITEMS}/{item.pk}/plannedFailover", {}, format="json")
        assert r.status_code == 202, r.content
        assert api.post(f"{ITEMS}/{item.pk}/plannedFailover", {}, format="json").status_code == 409
        failover = _job(r.data["id"], timeout=240)
        assert failover.state == JobState.SUCCEEDED, failover.error
        assert [s["state"] for s in failover.steps] == ["SUCCEEDED"] * 5
        writer.set()
        writer.thread.join(timeout=10)
        assert site.site.get_vm(machine.instance_uuid).power_state == "poweredOff"
        vm = RecoveredVm.objects.get(item=item, kind="FAILOVER", removed_at__isnull=True)
        assert (vm.name, vm.network.name, vm.power_state, vm.point_type) == ("app-e2e", "recovery-net", "poweredOn", "app_consistent")
        assert _vm_shas(vm) == _source_shas(site, item), "the recovered disks differ from the source after its shutdown"
        item.refresh_from_db()
        assert item.protection_state == P.FAILED_OVER
        # Failed over: out of the agent's assignment, and the periodic apply leaves it alone.
        agent = MobilityAgent.objects.get(machine=machine)
        assert agent_assignment(agent=agent)["items"] == []
        assert item_apply(item_id=item.pk) == {"skipped": P.FAILED_OVER}
        shown = api.get(f"{ITEMS}/{item.pk}/").json()
        assert shown["failoverVm"]["name"] == "app-e2e" and shown["failoverVm"]["disks_verified"] == 2

        # --- change recovery point: back to the drill's point.
        r = api.post(f"{ITEMS}/{item.pk}/applyRecoveryPoint", {"recoveryPoint": "custom", "recoveryPointId": first_point.point_id}, format="json")
        assert r.status_code == 202, r.content
        assert api.post(f"{ITEMS}/{item.pk}/failoverCommit").status_code == 409  # one at a time
        changed = _job(r.data["id"])
        assert changed.state == JobState.SUCCEEDED, changed.error
        vm.refresh_from_db()
        assert vm.point_id == first_point.point_id and vm.power_state == "poweredOn"
        assert _vm_shas(vm) == first_shas

        # --- commit: final; every recovery point but the VM's is released.
        r = api.post(f"{ITEMS}/{item.pk}/failoverCommit")
        assert r.status_code == 202
        committed = _job(r.data["id"])
        assert committed.state == JobState.SUCCEEDED, committed.error
        item.refresh_from_db()
        assert item.protection_state == P.FAILOVER_COMMITTED
        assert list(RecoveryPoint.objects.filter(item=item).values_list("point_id", flat=True)) == [vm.point_id]
        assert [p.point_id for p in applier_for(item).list_points()] == [vm.point_id]
        assert committed.result["released"] >= 2
        assert _vm_shas(vm) == first_shas  # the VM's disks are its own: releasing points left them


def test_failed_unplanned_failover_leaves_the_item_protected(site, api):
    recovery = vault_services.recovery_site_create(
        vault=site.vault, name="recovery-site", host=str(site.tmp / "recovery"),
        networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")],
    )
    machine = site.vault.machines.get(name="app-e2e")
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        r = api.post(f"{ITEMS}/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk,
                                   "process_server": site.ps.pk, "recovery_site": recovery.pk}, format="json")
        assert _job(r.data["id"]).state == JobState.SUCCEEDED
        item = ProtectedItem.objects.get(machine=machine)
        point, shas, writer = _app_point(site, item, writer)
        # A VM of the production name already runs at the recovery site: the failover fails.
        with recovery.connector() as connector:
            from replication.dataplane.recovery import recovery_disks
            from replication.engine import applier_for

            blocker = connector.create_vm(name="app-e2e", network="recovery-net",
                                          disks=recovery_disks(applier_for(item), point.point_id))
        r = api.post(f"{ITEMS}/{item.pk}/unplannedFailover",
                     {"recoveryPoint": "latest_app_consistent", "shutDownSource": False}, format="json")
        failed = _job(r.data["id"])
        assert failed.state == JobState.FAILED
        assert "already exists" in failed.error and "The item is protected again" in failed.error
        item.refresh_from_db()
        assert item.protection_state == P.PROTECTED and item.last_error.startswith("Failover failed")
        assert site.site.get_vm(machine.instance_uuid).power_state == "poweredOn"
        # Replication went back to work, and the blocker (not ours) is untouched.
        newest = RecoveryPoint.objects.filter(item=item).order_by("-seq").first()
        wait_for(lambda: RecoveryPoint.objects.filter(item=item, seq__gt=newest.seq).exists(), timeout=60,
                 message="replication after the failed failover")
        with recovery.connector() as connector:
            assert connector.get_vm(blocker.vm_id).power_state == "poweredOn"
            connector.destroy_vm(blocker.vm_id)

        # Once the name is free the same failover works, byte for byte.
        r = api.post(f"{ITEMS}/{item.pk}/unplannedFailover",
                     {"recoveryPoint": "custom", "recoveryPointId": str(point.pk), "shutDownSource": True}, format="json")
        done = _job(r.data["id"])
        assert done.state == JobState.SUCCEEDED, done.error
        writer.set()
        writer.thread.join(timeout=10)
        vm = RecoveredVm.objects.get(item=item, kind="FAILOVER", removed_at__isnull=True)
        assert _vm_shas(vm) == shas
        assert site.site.get_vm(machine.instance_uuid).power_state == "poweredOff"


# --- a job whose worker died: the reaper's failure hook cleans up like a failing job ---------


def _reaped(item: ProtectedItem, job_type: str, **params) -> Job:
    from datetime import timedelta

    from django.utils import timezone

    from core.jobs import jobs_reap

    old = timezone.now() - timedelta(minutes=30)
    job = Job.objects.create(vault=item.vault, type=job_type, state=JobState.RUNNING, target_type="protected_item",
                             target_id=str(item.pk), target_name=item.name, params=params, started_at=old, heartbeat_at=old)
    assert jobs_reap(timeout_seconds=60) == [str(job.id)]
    return Job.objects.get(pk=job.pk)


def _recovery_item(tmp_path, state: str, tstate: str = "NONE") -> ProtectedItem:
    from replication.services import protected_item_set_recovery
    from tests.factories import ProtectedItemFactory

    item = ProtectedItemFactory()
    site = vault_services.recovery_site_create(vault=item.vault, name="rs", host=str(tmp_path / "rs"),
                                               networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")])
    protected_item_set_recovery(item=item, recovery_site=site)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=state, test_failover_state=tstate)
    return ProtectedItem.objects.select_related("recovery_site", "recovery_network", "test_network").get(pk=item.pk)


def _recorded_vm(item: ProtectedItem, kind: str) -> RecoveredVm:
    from django.utils import timezone

    return RecoveredVm.objects.create(
        item=item, kind=kind, site=item.recovery_site, network=item.test_network if kind == "TEST" else item.recovery_network,
        vm_id="vm-that-the-site-no-longer-has", name=f"{item.name}-test" if kind == "TEST" else item.name,
        point_id="p", point_time=timezone.now(), point_type="crash_consistent",
    )


def test_reaped_test_failover_removes_its_vm_and_ends_the_drill(db, tmp_path):
    item = _recovery_item(tmp_path, P.PROTECTED, "IN_PROGRESS")
    vm = _recorded_vm(item, "TEST")
    job = _reaped(item, "TEST_FAILOVER")
    assert job.error.startswith("The worker running this job stopped reporting")
    assert f"The VM {vm.name} was removed from rs." in job.error
    item.refresh_from_db()
    vm.refresh_from_db()
    assert item.test_failover_state == "NONE" and item.last_error.startswith("Test failover failed: The worker")
    assert vm.removed_at is not None and "test failover failed" in vm.cleanup_notes


def test_reaped_failover_puts_the_item_back_to_protected(db, tmp_path):
    item = _recovery_item(tmp_path, P.FAILOVER_IN_PROGRESS)
    vm = _recorded_vm(item, "FAILOVER")
    ProtectedItem.objects.filter(pk=item.pk).update(pending_bookmarks=[{"id": "b1", "label": "planned failover 2026-11-30"}])
    job = _reaped(item, "PLANNED_FAILOVER", shut_down_source=True, network_id=item.recovery_network_id)
    assert f"The VM {vm.name} was removed from rs." in job.error and "The item is protected again." in job.error
    item.refresh_from_db()
    assert item.protection_state == P.PROTECTED and item.pending_bookmarks == []
    assert item.last_error.startswith("Failover failed: The worker")
    assert RecoveredVm.objects.get(pk=vm.pk).removed_at is not None


def test_reaped_cleanup_leaves_the_drill_to_clean_up_again(db, tmp_path):
    item = _recovery_item(tmp_path, P.PROTECTED, "CLEANING_UP")
    _recorded_vm(item, "TEST")
    job = _reaped(item, "TEST_FAILOVER_CLEANUP", notes="")
    assert "run the cleanup again" in job.error
    assert ProtectedItem.objects.get(pk=item.pk).test_failover_state == "SUCCEEDED"
