"""Disks that change shape, end to end on the simulated site (real worker, process server and
agent processes): a disk that grows and a disk added to a protected VM are picked up without
re-seeding the others, a disk removed stops replicating after an event and an alert. Each
test ends with the newest recovery point compared byte for byte with the source at its new
shape, and a point from before the change compared with the source as it was then, at its
old size.
"""
from __future__ import annotations

import hashlib

import pytest

from core.choices import JobState
from core.models import Job
from replication.models import MobilityAgent, ProtectedItem, RecoveryPoint
from tests.conftest import bookmarked_point, wait_for
from tests.e2e.harness import MiB, Site, process_server, sha256_file

pytestmark = pytest.mark.timeout(600)

WORKLOAD = {"rate_bytes_per_s": MiB, "write_size": 32 * 1024, "pattern": "uniform"}


@pytest.fixture
def make_site(tmp_path, live_server, celery_worker):
    sites = []

    def make(vms):
        s = Site(tmp=tmp_path, live_url=live_server.url, vms=vms)
        sites.append(s)
        return s

    yield make
    for s in sites:
        s.close()


def protect(site: Site, api, name: str) -> ProtectedItem:
    machine = site.vault.machines.get(name=name)
    r = api.post("/api/v1/replicationProtectedItems/", {"vault": site.vault.pk, "machine": machine.pk,
                                                         "policy": site.policy.pk, "process_server": site.ps.pk},
                 format="json")
    assert r.status_code == 202, r.content
    job = wait_for(lambda: Job.objects.filter(pk=r.data["id"], state__in=JobState.TERMINAL).first(), timeout=180,
                   message=f"enabling {name}")
    assert job.state == JobState.SUCCEEDED, job.error
    return ProtectedItem.objects.get(machine=machine)


def rediscover(site: Site) -> None:
    """What the periodic discovery does: read the site's inventory into the vault."""
    from vault.discovery import machines_upsert

    machines_upsert(vcenter=site.vcenter, vms=site.site.discover().vms)


def agent_status(item: ProtectedItem) -> dict:
    agent = MobilityAgent.objects.get(machine=item.machine)
    return next((s for s in (agent.last_status or {}).get("items", []) if s["item_id"] == str(item.pk)), {})


def caught_up(item: ProtectedItem) -> bool:
    item.refresh_from_db(fields=["applied_seq", "acked_seq", "agent_backlog_bytes"])
    status = agent_status(item)
    return (status.get("phase") == "delta" and item.agent_backlog_bytes == 0 and item.acked_seq
            and item.applied_seq >= item.acked_seq and item.applied_seq >= (status.get("pass_done_seq") or 0))


def quiet_point(site: Site, item: ProtectedItem, writer) -> RecoveryPoint:
    """Stop the VM's writes, let replication catch up, and cut an app-consistent point."""
    from replication.scheduling import protected_item_app_consistent_snapshot

    writer.set()
    writer.thread.join(timeout=10)
    wait_for(lambda: caught_up(item), timeout=180, message="replication catching up")
    bookmark = protected_item_app_consistent_snapshot(item=item)
    point = bookmarked_point(item, bookmark, timeout=120, message="an app-consistent point")
    assert point.type == "app_consistent"
    return point


def image(api, point: RecoveryPoint, disk: int) -> bytes:
    r = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/{disk}/image")
    assert r.status_code == 200, getattr(r, "content", r)
    return b"".join(r.streaming_content)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_disk_that_grows_and_a_disk_added_are_replicated_without_reseeding(make_site, api):
    site = make_site([{"name": "shape-grow", "disks": [4 * MiB], "workload": WORKLOAD}])
    uuid_ = site.vault.machines.get(name="shape-grow").instance_uuid
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        item = protect(site, api, "shape-grow")
        first = item.replica_disks.get()
        source0 = site.site.disk_path(uuid_, first.source_disk_key)
        old_point = quiet_point(site, item, writer)
        old_bytes = read(source0)
        assert len(old_bytes) == 4 * MiB and image(api, old_point, 0) == old_bytes
        sent_before = agent_status(item)["acked_seq"]

        # The VM's disk grows to 6 MiB and a 3 MiB disk is added; discovery finds them.
        site.site.resize_disk(uuid_, first.source_disk_key, 6 * MiB)
        added = site.site.add_disk(uuid_, 3 * MiB)
        writer = site.start_workload()  # the guest writes all over both disks, the new space included
        rediscover(site)
        new = item.replica_disks.get(source_disk_key=added.key)
        assert new.index == 1 and new.removed_at is None
        kinds = set(site.vault.events.filter(protected_item=item).values_list("kind", flat=True))
        assert {"disk_added", "disk_grown"} <= kinds

        # The added disk gets its own full copy; the grown one is not copied again.
        wait_for(lambda: agent_status(item).get("phase") == "delta" and agent_status(item).get("total_bytes") == 3 * MiB,
                 timeout=180, message="the added disk's initial copy")
        point = quiet_point(site, item, writer)
        item.refresh_from_db()
        assert item.protection_state == "PROTECTED"  # never marked for a resync, nothing re-seeded
        assert not site.vault.events.filter(protected_item=item, kind="resync_required").exists()
        assert agent_status(item)["acked_seq"] > sent_before
        first.refresh_from_db()
        new.refresh_from_db()
        assert (first.capacity_bytes, new.capacity_bytes) == (6 * MiB, 3 * MiB)  # as apply grew and made them

        # The newest point equals the source at its new shape, byte for byte ...
        assert image(api, point, 0) == read(source0)
        assert image(api, point, 1) == read(site.site.disk_path(uuid_, added.key))
        assert len(image(api, point, 0)) == 6 * MiB
        # ... and the point from before the change is still the source as it was then, at 4 MiB,
        # without the disk added after it.
        assert image(api, old_point, 0) == old_bytes
        assert api.get(f"/api/v1/recoveryPoints/{old_point.pk}/disks/1/image").status_code == 404


def test_a_disk_removed_stops_replicating_after_an_event_and_an_alert(make_site, api):
    from replication.engine import applier_for
    from vault.models import Alert

    site = make_site([{"name": "shape-remove", "disks": [4 * MiB, 2 * MiB], "workload": WORKLOAD}])
    uuid_ = site.vault.machines.get(name="shape-remove").instance_uuid
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        item = protect(site, api, "shape-remove")
        disk0, disk1 = item.replica_disks.order_by("index")
        path0 = site.site.disk_path(uuid_, disk0.source_disk_key)
        path1 = site.site.disk_path(uuid_, disk1.source_disk_key)
        old_point = quiet_point(site, item, writer)
        old0, old1 = read(path0), read(path1)

        # The second disk is removed from the VM; discovery finds it gone.
        site.site.remove_disk(uuid_, disk1.source_disk_key)
        rediscover(site)
        disk1.refresh_from_db()
        assert disk1.removed_at is not None
        event = site.vault.events.get(protected_item=item, kind="disk_removed")
        assert event.severity == "WARNING" and "replication stopped" in event.message
        alert = Alert.objects.get(protected_item=item, kind="disk_removed")
        assert alert.state == "ACTIVE"

        # the item page says so, beside the disk
        from django.contrib.auth import get_user_model
        from django.test import Client

        portal = Client()
        portal.force_login(get_user_model().objects.get(username="admin"))
        page = portal.get(f"/items/{item.pk}/").content.decode()
        assert "Removed from the machine" in page and "kept for the recovery points taken before" in page

        writer = site.start_workload()  # the guest goes on writing to the disk it still has
        assert disk1.index not in {d["index"] for d in _assigned_disks(item)}
        # the agent announces the end of the disk's stream; the replica retires it there
        wait_for(lambda: set(applier_for(item).disk_sizes()) == {disk0.index}, timeout=60,
                 message="the replica retiring the removed disk")
        # (apply passes start on upload, so the retirement can come before the guest's next write)
        wait_for(lambda: read(path0) != old0, timeout=60, message="the guest writing after the removal")
        point = quiet_point(site, item, writer)
        item.refresh_from_db()
        assert item.protection_state == "PROTECTED"
        assert applier_for(item).get_point(point.point_id).snapshots.keys() == {disk0.index}  # replicated no more

        # The newest point: the disk the VM has, equal to the source; no removed disk.
        assert image(api, point, 0) == read(path0)
        assert read(path0) != old0  # the guest did write after the removal
        assert api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/1/image").status_code == 404
        # The point from before the removal keeps both disks as they were.
        assert image(api, old_point, 0) == old0
        assert hashlib.sha256(image(api, old_point, 1)).hexdigest() == hashlib.sha256(old1).hexdigest()
        assert sha256_file(path1) == hashlib.sha256(old1).hexdigest()  # the removed disk's file stays


def _assigned_disks(item: ProtectedItem) -> list[dict]:
    from replication.agents import agent_assignment

    agent = MobilityAgent.objects.get(machine=item.machine)
    return next(i["disks"] for i in agent_assignment(agent=agent)["items"] if i["item_id"] == str(item.pk))
