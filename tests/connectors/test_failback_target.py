"""Failback targets through real parts: a replica built by the apply engine from real sealed
logs (local storage), written back into an on-premises VM's disks or into a new VM at an
alternate location, on the simulated site and on vcsim over the datastore HTTP interface;
every check, and every refusal, ends in a byte comparison."""
from __future__ import annotations

import json
import os
import random
import ssl
import urllib.parse
import urllib.request

import pytest

from mobility.filter import OVERFLOW, last_seq, overflow_reason
from replication.dataplane.recovery import DiskDigest, RecoveryDisk, VerificationFailed, recovery_disks
from replication.dataplane.storage.local import LocalStorage
from tests.dataplane.test_recovery import plain_digest, sparse_replica
from tests.factories import VaultFactory
from vault.choices import VCenterKind
from vault.connectors.base import AuthenticationFailed, ConnectorError, NotFound, OperationFailed
from vault.connectors.failback import SimulatedFailbackTarget, VSphereFailbackTarget
from vault.connectors.simsite import WorkloadRunner
from vault.connectors.simulated import SimulatedSite, disk_file, journal_path, vm_uuid_for
from vault.connectors.sites import open_failback_target, open_recovery_site
from vault.discovery import failback_target_for
from vault.services import vcenter_create

MiB = 1024 * 1024
USER, PASSWORD = "administrator@vsphere.local", "on-prem-secret"
SIZES = [5 * MiB + 1536, 3 * MiB]  # the disks sparse_replica makes


@pytest.fixture
def replica(tmp_path):
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=2)
    point = applier.list_points()[-1]
    yield source.images[point.seq], recovery_disks(applier, point.point_id)
    storage.close()


def on_prem(tmp_path, *, power_state="poweredOff", disks=None, **kw):
    """A simulated on-premises site with VM db-01 whose disks hold random bytes."""
    data_dir = str(tmp_path / "on-prem")
    SimulatedSite.create(data_dir, user=USER, password=PASSWORD,
                         vms=[{"name": "db-01", "disks": disks or SIZES, "power_state": power_state}], **kw)
    vm_uuid = vm_uuid_for("db-01")
    rng = random.Random(5)
    for key, size in zip((2000, 2001), disks or SIZES):
        with open(disk_file(data_dir, vm_uuid, key), "r+b") as f:
            f.write(rng.randbytes(size))
    return data_dir, vm_uuid


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def same(actual: bytes | dict, expected: bytes | dict) -> bool:
    """Equal bytes (or equal files by name); else fail with where they differ, not a diff of megabytes."""
    if isinstance(expected, dict):
        if sorted(actual) != sorted(expected):
            pytest.fail(f"files {sorted(actual)}, expected {sorted(expected)}")
        return all(same(actual[name], expected[name]) for name in expected)
    if actual != expected:
        at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
        pytest.fail(f"{len(actual)} bytes, expected {len(expected)}; they differ first at byte {at}")
    return True


def disk_files(data_dir: str) -> dict[str, bytes]:
    """Every file under disks/ (temporary ones too), by relative path."""
    root = os.path.join(data_dir, "disks")
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = read(path)
    return out


def wrong_digest(disk: RecoveryDisk) -> RecoveryDisk:
    """The same replica snapshot, expected to read back with another digest."""
    return RecoveryDisk(index=disk.index, size_bytes=disk.size_bytes, storage=disk.storage, disk_name=disk.disk_name,
                        snapshot=disk.snapshot,
                        expected=DiskDigest(index=disk.index, size_bytes=disk.size_bytes, digest="blake3:" + "00" * 32))


# --- simulated site ------------------------------------------------------------------------------


def test_simulated_restore_writes_exactly_the_image_into_the_powered_off_vm(tmp_path, replica):
    images, disks = replica
    # Disk 2001 is bigger than its image (grown on premises after the failover).
    data_dir, vm_uuid = on_prem(tmp_path, disks=[SIZES[0], 4 * MiB])
    seq_before = last_seq(journal_path(data_dir, vm_uuid, 2000))
    steps = []
    with open_failback_target("simulated", data_dir=data_dir, user=USER, password=PASSWORD) as target:
        before = target.vm(vm_uuid)
        assert [(d.key, d.index, d.size_bytes, d.digest) for d in before.disks] == [
            (2000, 0, SIZES[0], ""), (2001, 1, 4 * MiB, "")]
        restored = target.restore_vm(vm_uuid, {2000: disks[0], 2001: disks[1]},
                                     progress=lambda text, f: steps.append((text, f)))
        assert restored.power_state == "poweredOff" and restored.name == "db-01"
        assert restored.host == before.host and restored.datastore == "datastore1"
        assert same(read(disk_file(data_dir, vm_uuid, 2000)), images[0])
        assert same(read(disk_file(data_dir, vm_uuid, 2001)), images[1] + bytes(MiB))  # zeros past the image
        for d, image in zip(restored.disks, images.values()):
            assert d.location == disk_file(data_dir, vm_uuid, d.key)
            assert d.digest == plain_digest(image) and d.method in ("clone", "sparse-copy", "copy")
        assert target.disk_source(vm_uuid, 2000) == disk_file(data_dir, vm_uuid, 2000)
        assert target.vm(vm_uuid).power_state == "poweredOff"
    assert steps[-1][1] == 1.0 and sum(text.startswith("Disk") and "verified" in text for text, _f in steps) == 2
    assert sorted(disk_files(data_dir)) == [f"{vm_uuid}/2000.img", f"{vm_uuid}/2001.img"]  # no temporary file left
    # The journals say the disks changed outside the VM: an agent resynchronizes them.
    for key in (2000, 2001):
        assert "replaced outside the VM" in overflow_reason(journal_path(data_dir, vm_uuid, key))
    assert last_seq(journal_path(data_dir, vm_uuid, 2000)) == seq_before
    with SimulatedSite(data_dir, USER, PASSWORD) as site:
        assert "restored by a Lifeboat failback" in site.recent_events(vm_uuid)[0].message


def test_simulated_restore_refusals_change_nothing(tmp_path, replica):
    images, disks = replica
    data_dir, vm_uuid = on_prem(tmp_path, power_state="poweredOn", disks=[SIZES[0], 2 * MiB])
    original = disk_files(data_dir)
    with open_failback_target("simulated", data_dir=data_dir, user=USER, password=PASSWORD) as target:
        with pytest.raises(OperationFailed, match="the VM is poweredOn; power it off first"):
            target.restore_vm(vm_uuid, {2000: disks[0]})
        target.power_off(vm_uuid)
        target.power_off(vm_uuid)  # already off: fine
        with pytest.raises(NotFound, match=r"no disk 2005 \(its disks: 2000, 2001\)"):
            target.restore_vm(vm_uuid, {2000: disks[0], 2005: disks[1]})
        with pytest.raises(OperationFailed, match=f"disk 2001 .* holds {2 * MiB} bytes, less than the {3 * MiB}"):
            target.restore_vm(vm_uuid, {2000: disks[0], 2001: disks[1]})
        with pytest.raises(OperationFailed, match="no disk to restore"):
            target.restore_vm(vm_uuid, {})
        with pytest.raises(NotFound):
            target.restore_vm("no-such-vm", {2000: disks[0]})
    assert same(disk_files(data_dir), original)
    assert not os.path.exists(os.path.join(journal_path(data_dir, vm_uuid, 2000), OVERFLOW))


def test_simulated_verification_failure_leaves_every_original_disk_intact(tmp_path, replica):
    images, disks = replica
    data_dir, vm_uuid = on_prem(tmp_path)
    original = disk_files(data_dir)
    with open_failback_target("simulated", data_dir=data_dir, user=USER, password=PASSWORD) as target:
        # Disk 2000's image is right, 2001's reads back with another digest: neither is replaced.
        with pytest.raises(VerificationFailed) as err:
            target.restore_vm(vm_uuid, {2000: disks[0], 2001: wrong_digest(disks[1])})
        assert "'db-01'" in str(err.value) and err.value.actual == plain_digest(images[1])
        assert err.value.location == disk_file(data_dir, vm_uuid, 2001)
        assert same(disk_files(data_dir), original)
        for key in (2000, 2001):
            assert not os.path.exists(os.path.join(journal_path(data_dir, vm_uuid, key), OVERFLOW))
        # The same restore with the right digests succeeds.
        target.restore_vm(vm_uuid, {2000: disks[0], 2001: disks[1]})
    assert same(read(disk_file(data_dir, vm_uuid, 2001)), images[1])


def test_the_workload_runner_writes_to_the_restored_disk_once_the_vm_is_on(tmp_path, replica):
    images, disks = replica
    data_dir, vm_uuid = on_prem(tmp_path, power_state="poweredOn")
    site = SimulatedSite(data_dir, USER, PASSWORD)
    site.connect()
    site.set_workload(vm_uuid, rate_bytes_per_s=256 * 1024, write_size=4096, pattern="uniform")
    writes = []
    now = [0.0]
    runner = WorkloadRunner(site, seed=11, clock=lambda: now[0], reload_interval=1.0,
                            on_write=lambda vm, key, offset, data: writes.append((key, offset, data)))
    try:
        for _ in range(5):
            now[0] += 0.1
            runner.step()
        assert writes  # it has both disk files open
        # Off, restored and on again before the runner read site.json again: it never saw the VM off.
        with open_failback_target("simulated", data_dir=data_dir, user=USER, password=PASSWORD) as target:
            target.power_off(vm_uuid)
            target.restore_vm(vm_uuid, {2000: disks[0], 2001: disks[1]})
            assert same(read(disk_file(data_dir, vm_uuid, 2000)), images[0])
            target.power_on(vm_uuid)
            target.power_on(vm_uuid)  # already on: fine
        seqs = {key: last_seq(journal_path(data_dir, vm_uuid, key)) for key in (2000, 2001)}
        restored_at = len(writes)
        now[0] += 1.0  # the next step reloads site.json
        for _ in range(10):
            now[0] += 0.1
            runner.step()
    finally:
        runner.close()
        site.close()
    after = writes[restored_at:]
    assert {key for key, _o, _d in after} == {2000, 2001}
    for key, index in ((2000, 0), (2001, 1)):
        expected = bytearray(images[index])
        for k, offset, data in after:
            if k == key:
                expected[offset: offset + len(data)] = data
        assert same(read(disk_file(data_dir, vm_uuid, key)), bytes(expected))
        # The journal stopped at the restore (it does not cover it): the agent resynchronizes.
        assert last_seq(journal_path(data_dir, vm_uuid, key)) == seqs[key]


def test_simulated_create_vm_at_an_alternate_host_and_datastore(tmp_path, replica):
    images, disks = replica
    data_dir, vm_uuid = on_prem(tmp_path, datastores=("datastore1", "datastore2"))
    original = disk_files(data_dir)
    with open_failback_target("simulated", data_dir=data_dir, user=USER, password=PASSWORD) as target:
        assert target.hosts() == ["esx-01.sim.local", "esx-02.sim.local"]
        assert target.datastores() == ["datastore1", "datastore2"]
        assert target.networks() == ["VM Network"]
        bad = dict(name="db-01-failback", host="esx-02.sim.local", datastore="datastore2", network="VM Network")
        with pytest.raises(OperationFailed, match="'db-01' already exists"):
            target.create_vm(**{**bad, "name": "db-01"}, disks=disks)
        with pytest.raises(NotFound, match=r"no host 'esx-09' \(it has: esx-01.sim.local, esx-02.sim.local\)"):
            target.create_vm(**{**bad, "host": "esx-09"}, disks=disks)
        with pytest.raises(NotFound, match=r"no datastore 'nfs-1' \(it has: datastore1, datastore2\)"):
            target.create_vm(**{**bad, "datastore": "nfs-1"}, disks=disks)
        with pytest.raises(NotFound, match=r"no network 'prod' \(it has: VM Network\)"):
            target.create_vm(**{**bad, "network": "prod"}, disks=disks)
        with pytest.raises(VerificationFailed):
            target.create_vm(**bad, disks=[disks[0], wrong_digest(disks[1])])
        assert same(disk_files(data_dir), original)  # nothing was made, and the failed VM is gone again
        steps = []
        made = target.create_vm(**bad, disks=list(reversed(disks)), progress=lambda text, f: steps.append(text))
        assert made.name == "db-01-failback" and made.power_state == "poweredOff"
        assert made.host == "esx-02.sim.local" and made.datastore == "datastore2"
        assert [(d.key, d.index, d.size_bytes) for d in made.disks] == [(2000, 0, SIZES[0]), (2001, 1, SIZES[1])]
        for d in made.disks:
            assert same(read(d.location), images[d.index])
            assert d.digest == plain_digest(images[d.index])
        assert "ready (powered off)" in steps[-1]
        assert target.vm(made.vm_uuid).disks[1].digest == ""
    with SimulatedSite(data_dir, USER, PASSWORD) as site:
        vm = site.get_vm(made.vm_uuid)
        assert vm.host == "esx-02.sim.local" and {d.datastore for d in vm.disks} == {"datastore2"}
        assert site.read_state()["vms"][made.vm_uuid]["network"] == "VM Network"
    assert same({k: v for k, v in disk_files(data_dir).items() if k.startswith(vm_uuid)}, original)


def test_a_simulated_recovery_site_opens_as_a_source_site_with_its_source_login(tmp_path, replica):
    images, disks = replica
    data_dir = str(tmp_path / "recovery-site")
    with open_recovery_site("simulated", data_dir=data_dir, networks=["recovery-net"]) as site:
        info = site.create_vm(name="db-01", network="recovery-net", disks=disks)
        site.source_login("failback@recovery.sim.local", "protect-me-back")
        with pytest.raises(ConnectorError, match="a user name and a password"):
            site.source_login("", "x")
    assert "protect-me-back" not in read(os.path.join(data_dir, "site.json")).decode()
    with SimulatedSite(data_dir, "failback@recovery.sim.local", "protect-me-back") as as_source:
        inventory = as_source.discover()
        assert [vm.instance_uuid for vm in inventory.vms] == [info.vm_id]
        assert inventory.vms[0].power_state == "poweredOn"
    with pytest.raises(AuthenticationFailed):
        SimulatedSite(data_dir, "failback@recovery.sim.local", "wrong").connect()
    # And as a failback target: the recovered VM's disk is the seed of its reverse replica.
    with open_failback_target("simulated", data_dir=data_dir, user="failback@recovery.sim.local",
                              password="protect-me-back") as target:
        assert target.networks() == ["recovery-net"]
        assert same(read(target.disk_source(info.vm_id, target.vm(info.vm_id).disks[1].key)), images[1])
    with pytest.raises(ConnectorError, match="Unknown failback target kind"):
        open_failback_target("hyperv", data_dir=data_dir)


@pytest.mark.django_db
def test_failback_target_for_a_simulated_endpoint(tmp_path):
    data_dir, vm_uuid = on_prem(tmp_path)
    vcenter = vcenter_create(vault=VaultFactory(), name="on-prem", host=data_dir, username=USER, password=PASSWORD,
                             kind=VCenterKind.SIMULATED)
    target = failback_target_for(vcenter)
    assert isinstance(target, SimulatedFailbackTarget)
    with target:
        assert target.vm(vm_uuid).name == "db-01"


# --- vSphere (vcsim) -------------------------------------------------------------------------------


def vsphere_target(server, **kw):
    params = dict(host=server.host, port=server.port, user=server.user, password=server.password,
                  ca_file=server.ca_file)
    params.update(kw)
    return open_failback_target("vcenter", **params)


def datastore_file(server, datastore: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"dcPath": "DC0", "dsName": datastore})
    url = f"https://{server.host}:{server.port}/folder/{urllib.parse.quote(path)}?{query}"
    with urllib.request.urlopen(url, context=ssl.create_default_context(cafile=server.ca_file), timeout=30) as r:
        return r.read()


def flat_path(backing_file: str) -> tuple[str, str]:
    """'[ds] dir/name.vmdk' -> ('ds', 'dir/name-flat.vmdk')."""
    datastore, path = backing_file[1:].split("] ", 1)
    return datastore, path[: -len(".vmdk")] + "-flat.vmdk"


@pytest.mark.peer
def test_vsphere_create_vm_at_an_alternate_host_and_datastore(vcsim_factory, replica):
    images, disks = replica
    server = vcsim_factory(ds=2)
    with vsphere_target(server) as target:
        assert isinstance(target, VSphereFailbackTarget)
        assert target.hosts() == ["DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2", "DC0_H0"]
        assert target.datastores() == ["LocalDS_0", "LocalDS_1"]
        assert "VM Network" in target.networks()
        place = dict(name="db-01-failback", host="DC0_H0", datastore="LocalDS_1", network="VM Network")
        with pytest.raises(NotFound, match=r"no host 'esx-9' \(it has: DC0_C0_H0, DC0_C0_H1, DC0_C0_H2, DC0_H0\)"):
            target.create_vm(**{**place, "host": "esx-9"}, disks=disks)
        with pytest.raises(NotFound, match=r"host DC0_H0 has no datastore 'nfs' \(it has: LocalDS_0, LocalDS_1\)"):
            target.create_vm(**{**place, "datastore": "nfs"}, disks=disks)
        with pytest.raises(NotFound, match="no network 'prod'"):
            target.create_vm(**{**place, "network": "prod"}, disks=disks)
        existing = server.inventory["vms"][0]["name"]
        with pytest.raises(OperationFailed, match="already exists"):
            target.create_vm(**{**place, "name": existing}, disks=disks)
        before = {vm["instance_uuid"] for vm in server.live_inventory()["vms"]}
        made = target.create_vm(**place, disks=disks)
        assert made.power_state == "poweredOff" and made.host == "DC0_H0" and made.datastore == "LocalDS_1"
        assert {vm["instance_uuid"] for vm in server.live_inventory()["vms"]} == before | {made.vm_uuid}
        live = server.live_vm(made.vm_uuid)
        assert live["power_state"] == "poweredOff" and live["host"] == "DC0_H0"
        assert {d["datastore"] for d in live["disks"]} == {"LocalDS_1"}
        for d in made.disks:
            assert d.method == "upload" and d.digest == plain_digest(images[d.index])
            assert same(datastore_file(server, *flat_path(d.location)), images[d.index])
            assert same(b"".join(target.disk_source(made.vm_uuid, d.key)), images[d.index])
        target.power_on(made.vm_uuid)
        target.power_on(made.vm_uuid)  # already on: fine
        assert server.live_vm(made.vm_uuid)["power_state"] == "poweredOn"


@pytest.mark.peer
def test_vsphere_restore_into_an_existing_vm(vcsim_factory, replica):
    images, disks = replica
    server = vcsim_factory()
    with server.connector() as vc:
        # Disk 2 is bigger than its image, disk 3 too small for it.
        vm = vc.create_vm(name="app-01", host="DC0_C0_H0", datastore="LocalDS_0",
                          disk_capacities_bytes=[SIZES[0], 4 * MiB, MiB])
        vc.power_on(vm.instance_uuid)
    keys = [d.key for d in vm.disks]
    flats = [flat_path(d.backing_file) for d in vm.disks]
    rng = random.Random(9)
    originals = [rng.randbytes(d.capacity_bytes) for d in vm.disks]
    with vsphere_target(server) as target:
        for flat, data in zip(flats, originals):
            target.files.put("DC0", flat[0], flat[1], data, len(data), action="seeding the test disk")
        with pytest.raises(OperationFailed, match="the VM is poweredOn; power it off first"):
            target.restore_vm(vm.instance_uuid, {keys[0]: disks[0]})
        target.power_off(vm.instance_uuid)
        with pytest.raises(OperationFailed, match=f"holds {MiB} bytes, less than the {3 * MiB}"):
            target.restore_vm(vm.instance_uuid, {keys[0]: disks[0], keys[2]: disks[1]})
        with pytest.raises(NotFound, match="has no disk 1"):
            target.restore_vm(vm.instance_uuid, {1: disks[0]})
        # A VM with a snapshot: its base disks are not written under it.
        moref = target.vc._find_vm(vm.instance_uuid)
        target.vc._wait(moref.CreateSnapshot_Task(name="before-failback", memory=False, quiesce=False), "snapshot")
        with pytest.raises(OperationFailed, match="has 1 snapshot"):
            target.restore_vm(vm.instance_uuid, {keys[0]: disks[0]})
        target.vc.remove_snapshot(vm.instance_uuid, target.vc.list_snapshots(vm.instance_uuid)[0].id)
        for flat, data in zip(flats, originals):
            assert same(datastore_file(server, *flat), data)  # refused before writing
        with pytest.raises(VerificationFailed) as err:
            target.restore_vm(vm.instance_uuid, {keys[1]: wrong_digest(disks[1])})
        assert err.value.actual == plain_digest(images[1]) and vm.disks[1].backing_file in str(err.value)
        restored = target.restore_vm(vm.instance_uuid, {keys[0]: disks[0], keys[1]: disks[1]})
        assert restored.power_state == "poweredOff"
        assert [(d.key, d.digest != "", d.method) for d in restored.disks] == [
            (keys[0], True, "upload"), (keys[1], True, "upload"), (keys[2], False, "")]
        assert same(datastore_file(server, *flats[0]), images[0])
        assert same(datastore_file(server, *flats[1]), images[1] + bytes(MiB))
        assert same(datastore_file(server, *flats[2]), originals[2])  # not restored: untouched
        assert same(b"".join(target.disk_source(vm.instance_uuid, keys[1])), images[1] + bytes(MiB))
        target.power_on(vm.instance_uuid)
        assert server.live_vm(vm.instance_uuid)["power_state"] == "poweredOn"
        target.power_off(vm.instance_uuid)
        target.power_off(vm.instance_uuid)  # already off: fine
        assert server.live_vm(vm.instance_uuid)["power_state"] == "poweredOff"


@pytest.mark.peer
@pytest.mark.django_db
def test_failback_target_for_a_vcenter_endpoint_pins_its_certificate(vcsim_factory):
    server = vcsim_factory()
    vcenter = vcenter_create(vault=VaultFactory(), name="on-prem", host=server.host, port=server.port,
                             username=server.user, password=server.password, thumbprint=server.thumbprint_sha256)
    target = failback_target_for(vcenter)
    assert isinstance(target, VSphereFailbackTarget)
    vm = server.inventory["vms"][0]
    with target:
        assert target.vm(vm["instance_uuid"]).name == vm["name"]


def test_extent_lines_of_a_descriptor():
    from vault.connectors.datastore_http import parse_extents

    text = ('# Disk DescriptorFile\nversion=1\ncreateType="vmfs"\nRW 10240 VMFS "db-01-flat.vmdk"\n'
            'ddb.adapterType = "lsilogic"\n')
    (extent,) = parse_extents(text.encode())
    assert (extent.access, extent.sectors, extent.kind, extent.file) == ("RW", 10240, "VMFS", "db-01-flat.vmdk")
    delta = 'RW 10240 VMFSSPARSE "db-01-000001-delta.vmdk"\n'
    assert [e.kind for e in parse_extents(delta.encode())] == ["VMFSSPARSE"]
    assert parse_extents(b"") == [] and parse_extents(json.dumps({"a": 1}).encode()) == []
