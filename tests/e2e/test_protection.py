"""Protection end to end on real parts: enable replication through the API, data flowing
agent -> process server -> storage -> replica disks, recovery points byte-exact against the
source, RPO, and disable cleaning up."""
from __future__ import annotations

import hashlib

import pytest

from core.choices import JobState
from core.models import Job
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import bookmarked_point, wait_for
from tests.e2e.harness import MiB, Site, process_server, sha256_file

pytestmark = pytest.mark.timeout(600)

VMS = [{
    "name": "db-e2e", "disks": [8 * MiB, 4 * MiB],
    "workload": {"rate_bytes_per_s": 2 * MiB, "write_size": 64 * 1024, "pattern": "hotspot"},
}]


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS)
    yield s
    s.close()


def _image_sha(api, point: RecoveryPoint, disk: int) -> str:
    response = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/{disk}/image")
    assert response.status_code == 200, response.content[:300]
    h = hashlib.sha256()
    for chunk in response.streaming_content:
        h.update(chunk)
    return h.hexdigest()


def _source_shas(site: Site, item: ProtectedItem) -> dict[int, str]:
    return {d.index: sha256_file(site.site.disk_path(item.machine.instance_uuid, d.source_disk_key)) for d in item.replica_disks.all()}


def test_protect_replicate_points_are_byte_exact_then_disable(site, api):
    from replication.scheduling import protected_item_app_consistent_snapshot

    machine = site.vault.machines.get(name="db-e2e")
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp) as (_, thumbprint):
        site.start_agents()
        site.start_beat()
        response = api.post("/api/v1/replicationProtectedItems/", {
            "vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk, "process_server": site.ps.pk,
        }, format="json")
        assert response.status_code == 202, response.content
        assert response["Location"].rstrip("/").endswith(f"/api/v1/replicationJobs/{response.data['id']}")
        job_id = response.data["id"]
        # The process server's heartbeat tells the vault its certificate; the agent pins it.
        wait_for(lambda: site.ps.__class__.objects.get(pk=site.ps.pk).thumbprint == thumbprint, message="process server heartbeat")
        job = wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=180, message="enable job")
        assert job.state == JobState.SUCCEEDED, job.error
        assert [s["state"] for s in job.steps] == ["SUCCEEDED"] * 5
        item = ProtectedItem.objects.get(machine=machine)
        assert item.protection_state == P.PROTECTED
        assert item.replica_disks.count() == 2

        # Recovery points while the VM keeps writing: each app-consistent point is cut where
        # the VM was quiesced; the writer is paused there so the source can be hashed.
        expected: dict[str, dict[int, str]] = {}
        for round_ in range(3):
            writer.set()
            writer.thread.join(timeout=10)
            shas = _source_shas(site, item)
            bookmark = protected_item_app_consistent_snapshot(item=ProtectedItem.objects.get(pk=item.pk))
            point = bookmarked_point(item, bookmark, timeout=90, message=f"app-consistent point {round_ + 1}")
            assert point.type == "app_consistent"
            expected[point.point_id] = shas
            writer = site.start_workload()
            wait_for(lambda: RecoveryPoint.objects.filter(item=item, time__gt=point.time, type="crash_consistent").exists(),
                     timeout=60, message="a crash-consistent point after more writes")
        writer.set()
        writer.thread.join(timeout=10)
        # An idle VM keeps getting recovery points (its agent's empty batches prove that
        # everything up to their time is shipped), so its RPO does not climb while it idles.
        from django.utils import timezone

        idle_since = timezone.now()
        wait_for(lambda: RecoveryPoint.objects.filter(item=item, type="crash_consistent", time__gte=idle_since).exists(),
                 timeout=60, message="a recovery point while the VM is idle")

        points = {p.point_id: p for p in RecoveryPoint.objects.filter(item=item)}
        assert len(points) >= 6
        for point_id, shas in expected.items():
            for disk, sha in shas.items():
                assert _image_sha(api, points[point_id], disk) == sha, f"disk {disk} at point {point_id} differs from the source"
        # The same through the management command, to a file.
        from django.core.management import call_command

        first_id, first_shas = next(iter(expected.items()))
        out = site.tmp / "disk1.img"
        call_command("export_disk_image", str(points[first_id].pk), "1", str(out))
        assert sha256_file(str(out)) == first_shas[1]

        # RPO is measured from the newest point by the server's clock.
        from replication.monitoring import items_monitor

        items_monitor()
        item.refresh_from_db()
        assert item.rpo_seconds is not None and item.rpo_seconds < 120
        listed = api.get(f"/api/v1/recoveryPoints/?item={item.pk}").json()
        assert listed["count"] == len(points)

        # Disable: a job that removes the item and its replica data.
        response = api.delete(f"/api/v1/replicationProtectedItems/{item.pk}/")
        assert response.status_code == 202
        done = wait_for(lambda: Job.objects.filter(pk=response.data["id"], state__in=JobState.TERMINAL).first(), timeout=60, message="disable job")
        assert done.state == JobState.SUCCEEDED, done.error
        assert not ProtectedItem.objects.filter(pk=item.pk).exists()
        from replication.engine import storage

        assert storage().list_objects(f"replicas/{item.pk}/") == []
        assert storage().list_objects(f"logs/{item.pk}/") == []


def _protect_write_and_compare(site, api, config: dict) -> None:
    """Protect the VM, see points cut while it writes, stop it and compare a later point
    with the source, byte for byte."""
    from django.utils import timezone

    machine = site.vault.machines.get(name="db-e2e")
    writer = site.start_workload()
    with process_server(config, site.tmp):
        site.start_agents()
        response = api.post("/api/v1/replicationProtectedItems/", {
            "vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk, "process_server": site.ps.pk,
        }, format="json")
        assert response.status_code == 202, response.content
        job = wait_for(lambda: Job.objects.filter(pk=response.data["id"], state__in=JobState.TERMINAL).first(),
                       timeout=180, message="enable job")
        assert job.state == JobState.SUCCEEDED, job.error
        item = ProtectedItem.objects.get(machine=machine)
        started = timezone.now()
        wait_for(lambda: RecoveryPoint.objects.filter(item=item, type="crash_consistent", time__gt=started).count() >= 2,
                 timeout=60, message="points while the VM writes")
        writer.set()
        writer.thread.join(timeout=10)
        shas = _source_shas(site, item)
        idle_since = timezone.now()
        point = wait_for(lambda: RecoveryPoint.objects.filter(item=item, type="crash_consistent", time__gte=idle_since)
                         .order_by("time").first(), timeout=60, message="a point after the writes stopped")
        for disk, sha in shas.items():
            assert _image_sha(api, point, disk) == sha, f"disk {disk} at the point differs from the source"


def test_uploads_alone_drive_apply_without_any_sweep(site, api):
    """No apply sweep runs here: the process server's wake-ups after each upload are what
    apply the logs, finish the initial copy and cut the points, byte-exact."""
    _protect_write_and_compare(site, api, site.ps_config())


def test_when_the_vault_does_not_hear_the_wake_ups_the_sweep_applies_everything(site, api):
    """The process server's wake-ups go nowhere (a vault address it cannot reach): the apply
    sweep alone gets the item protected and its points cut, byte-exact."""
    from tests.e2e.harness import free_port

    config = site.ps_config()
    config["uploaded_url"] = f"http://127.0.0.1:{free_port()}/api/v1/processServers/{site.ps.pk}/uploaded"
    site.start_beat()
    _protect_write_and_compare(site, api, config)
