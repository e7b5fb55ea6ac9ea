"""Resynchronization end to end: an item marked as needing it (as when data was lost in
transit) is resynchronized on request, returns to Protected, and stays byte-exact."""
from __future__ import annotations

import hashlib

import pytest

from core.choices import JobState
from core.models import Job
from replication.models import ProtectedItem
from tests.conftest import bookmarked_point, wait_for
from tests.e2e.harness import MiB, Site, process_server, sha256_file

pytestmark = pytest.mark.timeout(600)

VMS = [{"name": "resync-e2e", "disks": [4 * MiB], "workload": {"rate_bytes_per_s": MiB, "write_size": 32 * 1024, "pattern": "uniform"}}]


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS)
    yield s
    s.close()


def test_resync_on_request_then_protected_and_byte_exact(site, api):
    from replication.scheduling import protected_item_app_consistent_snapshot
    from replication.services import protected_item_mark_resync_required

    machine = site.vault.machines.get(name="resync-e2e")
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        r = api.post("/api/v1/replicationProtectedItems/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk, "process_server": site.ps.pk}, format="json")
        job = wait_for(lambda: Job.objects.filter(pk=r.data["id"], state__in=JobState.TERMINAL).first(), timeout=180, message="enable job")
        assert job.state == JobState.SUCCEEDED, job.error
        item = ProtectedItem.objects.get(machine=machine)

        # The item needs resynchronization (as the agent reports after a journal overflow).
        assert protected_item_mark_resync_required(item=item, reason="test: data lost in transit")
        assert api.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication").status_code == 202
        second = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication")
        assert second.status_code == 409 and second.json()["error"]["current_state"] == "RESYNCING"
        resync = Job.objects.get(type="RESYNC", target_id=str(item.pk))
        done = wait_for(lambda: Job.objects.filter(pk=resync.pk, state__in=JobState.TERMINAL).first(), timeout=240, message="resync job")
        assert done.state == JobState.SUCCEEDED, done.error
        item.refresh_from_db()
        assert item.protection_state == "PROTECTED" and item.last_error == ""

        # An admin who doubts the replica may always ask for a repair, protected or not.
        again = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication")
        assert again.status_code == 202, again.content
        repair = wait_for(lambda: Job.objects.filter(pk=again.data["id"], state__in=JobState.TERMINAL).first(),
                          timeout=240, message="repair of a protected item")
        assert repair.state == JobState.SUCCEEDED, repair.error
        assert repair.result["applied_seq"] > done.result["applied_seq"]
        item.refresh_from_db()
        assert item.protection_state == "PROTECTED" and item.applied_seq >= repair.result["applied_seq"]

        # And the replica is right: an app-consistent point equals the source.
        writer.set()
        writer.thread.join(timeout=10)
        disk = item.replica_disks.get()
        source = sha256_file(site.site.disk_path(machine.instance_uuid, disk.source_disk_key))
        bookmark = protected_item_app_consistent_snapshot(item=item)
        point = bookmarked_point(item, bookmark, timeout=90, message="app-consistent point after the resync")
        assert point.type == "app_consistent"
        body = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/0/image")
        assert hashlib.sha256(b"".join(body.streaming_content)).hexdigest() == source


def test_a_replica_block_flipped_behind_lifeboats_back_is_found_and_repaired(site, api):
    """A 4 KiB block of the replica disk changes in storage without Lifeboat knowing; the
    admin's repairReplication compares the source with the replica's own checksums, sends
    what differs, and a new app-consistent point equals the source byte for byte."""
    from replication import engine
    from replication.models import MobilityAgent
    from replication.scheduling import protected_item_app_consistent_snapshot

    machine = site.vault.machines.get(name="resync-e2e")
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        r = api.post("/api/v1/replicationProtectedItems/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk, "process_server": site.ps.pk}, format="json")
        job = wait_for(lambda: Job.objects.filter(pk=r.data["id"], state__in=JobState.TERMINAL).first(), timeout=180, message="enable job")
        assert job.state == JobState.SUCCEEDED, job.error
        item = ProtectedItem.objects.get(machine=machine)
        writer.set()
        writer.thread.join(timeout=10)
        disk = item.replica_disks.get()
        source_path = site.site.disk_path(machine.instance_uuid, disk.source_disk_key)

        def applied_all() -> bool:
            item.refresh_from_db(fields=["applied_seq", "acked_seq", "agent_backlog_bytes"])
            return item.agent_backlog_bytes == 0 and item.acked_seq and item.applied_seq >= item.acked_seq
        wait_for(applied_all, timeout=120, message="the replica applying every write")

        # flip a block of the replica disk, holding the apply lease as a worker would
        wait_for(lambda: engine.apply_lease_take(item.pk), timeout=60, message="the apply lease")
        try:
            storage = engine.storage()
            offset = 37 * 4096
            old = storage.read_disk(disk.storage_name, offset, 4096)
            storage.write_disk(disk.storage_name, offset, bytes(b ^ 0xFF for b in old))
            storage.flush_disk(disk.storage_name)
            with open(source_path, "rb") as f:
                source = f.read()
            assert storage.read_disk(disk.storage_name, 0, len(source)) != source  # the replica is now wrong
        finally:
            engine.apply_lease_release(item.pk)

        repair = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication")
        assert repair.status_code == 202, repair.content
        done = wait_for(lambda: Job.objects.filter(pk=repair.data["id"], state__in=JobState.TERMINAL).first(),
                        timeout=240, message="the repair job")
        assert done.state == JobState.SUCCEEDED, done.error
        item.refresh_from_db()
        assert item.protection_state == "PROTECTED"
        status = next(s for s in MobilityAgent.objects.get(machine=machine).last_status["items"]
                      if s["item_id"] == str(item.pk))
        assert status["compared_bytes"] == 4 * MiB and 4096 <= status["sent_bytes"] < 4 * MiB

        bookmark = protected_item_app_consistent_snapshot(item=item)
        point = bookmarked_point(item, bookmark, timeout=90, message="app-consistent point after the repair")
        assert point.type == "app_consistent"
        body = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/0/image")
        assert hashlib.sha256(b"".join(body.streaming_content)).hexdigest() == sha256_file(source_path)
