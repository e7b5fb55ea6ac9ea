"""Multi-VM consistency end to end on real parts (API, Celery worker, process server, the
simulated site and its agents): two VMs whose writes depend on each other (A writes record
n and its write completes, then B writes "see A's record n") get shared recovery points
under a barrier while they write; at every complete group point, B's disk refers only to
records A's disk has. A round with a member whose writes cannot be held (a write hung in
flight) makes no complete group point."""
from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from core.choices import JobState
from core.models import Job
from mobility.filter import HOLD, WriteFilter
from replication.choices import GroupPointState, ProtectionState as P
from replication.models import GroupRecoveryPoint, ProtectedItem, RecoveryPoint
from tests.conftest import wait_for
from tests.e2e.harness import MiB, Site, process_server

pytestmark = pytest.mark.timeout(600)

SLOT = 512
DISK = 2 * MiB
SLOTS = DISK // SLOT
VMS = [{"name": "app-a", "disks": [DISK]}, {"name": "app-b", "disks": [DISK]}]


def record_a(n: int) -> bytes:
    return (b"A record %08d\n" % n).ljust(SLOT, b".")


def record_b(n: int) -> bytes:
    return (b"B: see A's record %08d\n" % n).ljust(SLOT, b"-")


class DependentWriter(threading.Thread):
    """A's record n completes, then B writes its reference to it; slot n on both disks."""

    def __init__(self, site: Site, a: ProtectedItem, b: ProtectedItem):
        super().__init__(daemon=True, name="dependent-writer")
        sim = site.site
        self.filters = []
        for item in (a, b):
            uuid_, key = item.machine.instance_uuid, item.replica_disks.get().source_disk_key
            self.filters.append(WriteFilter(sim.disk_path(uuid_, key), sim.journal_dir(uuid_, key)))
        self.stop = threading.Event()
        self.written = 0

    def run(self) -> None:
        fa, fb = self.filters
        n = 1
        while not self.stop.is_set() and n < SLOTS:
            fa.write(n * SLOT, record_a(n))  # completes (returns) first ...
            fb.write(n * SLOT, record_b(n))  # ... then B refers to it
            self.written = n
            n += 1
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        for f in self.filters:
            f.close()


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS)
    yield s
    s.close()


def _image(api, point: RecoveryPoint) -> bytes:
    response = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/0/image")
    assert response.status_code == 200, response.content[:300]
    return b"".join(response.streaming_content)


def _enable(site: Site, api, name: str) -> ProtectedItem:
    machine = site.vault.machines.get(name=name)
    response = api.post("/api/v1/replicationProtectedItems/", {
        "vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk, "process_server": site.ps.pk,
    }, format="json")
    assert response.status_code == 202, response.content
    job = wait_for(lambda: Job.objects.filter(pk=response.data["id"], state__in=JobState.TERMINAL).first(),
                   timeout=180, message=f"enable job of {name}")
    assert job.state == JobState.SUCCEEDED, job.error
    item = ProtectedItem.objects.get(machine=machine)
    wait_for(lambda: ProtectedItem.objects.get(pk=item.pk).protection_state == P.PROTECTED, timeout=120,
             message=f"{name} protected")
    return item


def _complete(point_id) -> bool:
    from replication.groups import group_point_complete

    return group_point_complete(GroupRecoveryPoint.objects.get(pk=point_id))


def test_group_points_are_consistent_across_vms_and_a_hung_member_makes_none(site, api):
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        a, b = _enable(site, api, "app-a"), _enable(site, api, "app-b")
        response = api.post("/api/v1/replicationGroups/", {
            "vault": site.vault.pk, "name": "app", "items": [str(a.pk), str(b.pk)], "point_frequency_seconds": 0,
        }, format="json")
        assert response.status_code == 201, response.content
        group_url = f"/api/v1/replicationGroups/{response.data['id']}"
        # An item is in one group at most: a second group with B is refused and changes nothing.
        refused = api.post("/api/v1/replicationGroups/", {"vault": site.vault.pk, "name": "other", "items": [str(b.pk)]},
                           format="json")
        assert refused.status_code == 400 and "one group at most" in refused.content.decode()
        assert ProtectedItem.objects.get(pk=b.pk).replication_group_id == a.__class__.objects.get(pk=a.pk).replication_group_id

        writer = DependentWriter(site, ProtectedItem.objects.get(pk=a.pk), ProtectedItem.objects.get(pk=b.pk))
        writer.start()
        taken = []
        hung = None
        try:
            wait_for(lambda: writer.written > 50, message="the dependent writes to start")
            for round_ in range(6):
                if round_ == 3:
                    # B's writer hangs in the middle of a write (it holds B's write path and does
                    # not let go): B's writes cannot be held, the round is abandoned.
                    jdir = site.site.journal_dir(b.machine.instance_uuid, b.replica_disks.get().source_disk_key)
                    fd = os.open(os.path.join(jdir, HOLD), os.O_RDWR | os.O_CREAT, 0o600)
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    try:
                        r = api.post(f"{group_url}/takePoint")
                    finally:
                        os.close(fd)
                    assert r.status_code == 201, r.content
                    assert r.data["state"] == GroupPointState.ABANDONED and not r.data["complete"], r.data
                    assert "not held within" in r.data["reason"]
                    hung = r.data["id"]
                    continue
                r = api.post(f"{group_url}/takePoint")
                assert r.status_code == 201, r.content
                assert r.data["state"] == GroupPointState.RELEASED, r.data
                taken.append(r.data["id"])
                before = writer.written
                wait_for(lambda: writer.written > before + 50, message="more dependent writes after the round")
            for point_id in taken:
                wait_for(lambda: _complete(point_id), timeout=120, message=f"group point {point_id} complete")
        finally:
            writer.close()

        listed = api.get(f"{group_url}/points").json()
        assert {p["id"] for p in listed["results"] if p["complete"]} == set(taken)
        # The abandoned round: no member has a point of it, and none ever will (the later
        # rounds' points are in both streams already, and nothing was bookmarked for it).
        assert not RecoveryPoint.objects.filter(group_point_id=hung).exists()
        assert all(b_.get("group") != hung for i in (a, b) for b_ in ProtectedItem.objects.get(pk=i.pk).pending_bookmarks)

        # Every complete group point: recover both disks at it; every reference on B is to a
        # record A has, byte for byte.
        references = 0
        for point_id in taken:
            pa = RecoveryPoint.objects.get(group_point_id=point_id, item=a)
            pb = RecoveryPoint.objects.get(group_point_id=point_id, item=b)
            assert pa.type == pb.type == "crash_consistent"
            disk_a, disk_b = _image(api, pa), _image(api, pb)
            assert len(disk_a) == len(disk_b) == DISK
            seen_b = 0
            for n in range(1, SLOTS):
                slot_b = disk_b[n * SLOT:(n + 1) * SLOT]
                if slot_b == bytes(SLOT):
                    break  # B's writes go in order: nothing after its first empty slot
                assert slot_b == record_b(n), f"B's slot {n} at group point {point_id} is torn"
                assert disk_a[n * SLOT:(n + 1) * SLOT] == record_a(n), \
                    f"at group point {point_id} B refers to A's record {n}, which A's disk does not have"
                seen_b = n
            assert seen_b > 0, f"group point {point_id} holds none of B's writes"
            references += seen_b
        assert references > 0
