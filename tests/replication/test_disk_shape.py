"""The vault's side of disks that change shape, through discovery of the simulated site (the
replication side is end to end in tests/e2e/test_disk_shape.py, vCenter's in
tests/connectors/test_disk_shape_vsphere.py): a disk that appears smaller is an alert and a
resynchronization; adding, growing and removing disks follow the machine, once each."""
from __future__ import annotations

import json

import pytest

from replication.choices import ProtectionState
from replication.disk_shape import protected_item_disks_sync
from tests.factories import ProtectedItemFactory, ReplicaDiskFactory, VaultFactory
from vault.choices import VCenterKind
from vault.connectors.simulated import SimulatedSite, disk_file, journal_path, vm_uuid_for
from vault.discovery import machines_upsert
from vault.models import Alert, DiscoveredMachine, Event
from vault.services import vcenter_create

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024
USER, PASSWORD = "sim-admin", "sim-password-1"


@pytest.fixture
def protected(tmp_path):
    """A simulated VM with two disks, discovered and protected (replicating both)."""
    site_dir = tmp_path / "site"
    SimulatedSite.create(site_dir, user=USER, password=PASSWORD, vms=[{"name": "db-01", "disks": [8 * MiB, 4 * MiB]}])
    site = SimulatedSite(site_dir, USER, PASSWORD)
    site.connect()
    vault = VaultFactory()
    vcenter = vcenter_create(vault=vault, name="lab", kind=VCenterKind.SIMULATED, host=str(site_dir), username=USER,
                             password=PASSWORD)
    machines_upsert(vcenter=vcenter, vms=site.discover().vms)
    machine = DiscoveredMachine.objects.get(vcenter=vcenter, name="db-01")
    item = ProtectedItemFactory(vault=vault, machine=machine, protection_state=ProtectionState.PROTECTED)
    for index, disk in enumerate(machine.disks.order_by("key")):
        ReplicaDiskFactory(item=item, index=index, source_disk_key=disk.key, capacity_bytes=disk.capacity_bytes,
                           source_path=disk_file(str(site_dir), machine.instance_uuid, disk.key),
                           journal_dir=journal_path(str(site_dir), machine.instance_uuid, disk.key))
    yield site, vcenter, item
    site.close()


def rediscover(site, vcenter) -> dict:
    return machines_upsert(vcenter=vcenter, vms=site.discover().vms)


def test_a_disk_that_appears_smaller_raises_an_alert_and_needs_a_resync(protected):
    site, vcenter, item = protected
    # vSphere never shrinks a disk; an inventory that says so anyway (here: edited by hand)
    state = json.loads(open(site.site_file).read())
    state["vms"][vm_uuid_for("db-01")]["disks"][1]["capacity_bytes"] = 2 * MiB
    with open(site.site_file, "w") as f:
        json.dump(state, f)

    rediscover(site, vcenter)

    item.refresh_from_db()
    assert item.protection_state == ProtectionState.RESYNC_REQUIRED
    assert "appears smaller" in item.last_error and "vSphere disks only grow" in item.last_error
    alert = Alert.objects.get(protected_item=item, kind="disk_shrunk")
    assert alert.state == "ACTIVE" and alert.severity == "CRITICAL"
    # the replica disk keeps its size until the resync announces the source's
    assert item.replica_disks.get(index=1).capacity_bytes == 4 * MiB


def test_disks_added_grown_and_removed_follow_the_machine_once(protected):
    site, vcenter, item = protected
    uuid_ = vm_uuid_for("db-01")
    keys = sorted(item.replica_disks.values_list("source_disk_key", flat=True))
    site.resize_disk(uuid_, keys[0], 16 * MiB)
    added = site.add_disk(uuid_, 2 * MiB)
    site.remove_disk(uuid_, keys[1])

    summary = rediscover(site, vcenter)
    assert (summary["disks_new"], summary["disks_changed"], summary["disks_removed"]) == (1, 1, 1)

    disks = {d.index: d for d in item.replica_disks.all()}
    assert set(disks) == {0, 1, 2}
    assert disks[2].source_disk_key == added.key and disks[2].capacity_bytes == 2 * MiB
    assert disks[2].source_path == disk_file(vcenter.host, uuid_, added.key) and disks[2].removed_at is None
    assert disks[1].removed_at is not None and disks[0].removed_at is None
    assert disks[0].capacity_bytes == 8 * MiB  # the replica grows when the stream says so (apply)
    kinds = sorted(Event.objects.filter(protected_item=item).values_list("kind", flat=True))
    assert kinds == ["disk_added", "disk_grown", "disk_removed"]
    assert Alert.objects.filter(protected_item=item, kind="disk_removed", state="ACTIVE").count() == 1
    item.refresh_from_db()
    assert item.protection_state == ProtectionState.PROTECTED

    # again: nothing more happens (the removed disk's index is never reused)
    rediscover(site, vcenter)
    assert protected_item_disks_sync(item=item) == {"added": [], "removed": [], "grown": [], "shrunk": []}
    assert item.replica_disks.count() == 3
    assert Event.objects.filter(protected_item=item).count() == 3


def test_a_disk_change_of_an_item_not_replicating_changes_nothing(protected):
    site, vcenter, item = protected
    type(item).objects.filter(pk=item.pk).update(protection_state=ProtectionState.FAILED_OVER)
    site.add_disk(vm_uuid_for("db-01"), 2 * MiB)
    rediscover(site, vcenter)
    assert item.replica_disks.count() == 2
    assert not Event.objects.filter(protected_item=item).exists()
