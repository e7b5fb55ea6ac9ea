"""Recovery sites through real parts: a replica built by the apply engine from real sealed logs
(local storage and Azurite), recovered onto the simulated recovery site and onto vcsim over
the datastore HTTP interface; every check ends in a byte comparison."""
from __future__ import annotations

import json
import os
import random
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest
from pyVmomi import vim

from replication.dataplane.recovery import VerificationFailed, recovery_disks
from replication.dataplane.storage.local import LocalStorage
from tests.dataplane.azurite import azurite, storage  # noqa: F401 - fixtures
from tests.dataplane.test_recovery import plain_digest, sparse_replica
from vault.connectors.base import ConnectorError, NotFound, OperationFailed
from vault.connectors.sites import open_recovery_site
from vault.connectors.simsite import WorkloadRunner
from vault.connectors.simulated import SimulatedSite

MiB = 1024 * 1024
NETWORKS = ["recovery-net", "test-net"]


def sim_site(tmp_path, **kw):
    return open_recovery_site("simulated", data_dir=str(tmp_path / "recovery-site"), networks=NETWORKS, **kw)


def disk_bytes(site, vm_id: str, index: int) -> bytes:
    return b"".join(site.read_disk(vm_id, index))


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def site_files(tmp_path) -> list[str]:
    root = tmp_path / "recovery-site" / "disks"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- simulated recovery site ---------------------------------------------------------------


def test_simulated_site_recovers_a_point_byte_exact_verified_and_running(storage, tmp_path):
    source, applier = sparse_replica(storage, points=3)
    point = applier.list_points()[1]
    disks = recovery_disks(applier, point.point_id)
    steps: list[tuple[str, float]] = []
    with sim_site(tmp_path, username="admin", password="secret-1") as site:
        assert site.networks() == NETWORKS
        info = site.create_vm(name="web-01-test", network="test-net", disks=disks,
                              progress=lambda text, f: steps.append((text, f)))
        assert info.power_state == "poweredOn" and info.network == "test-net" and info.name == "web-01-test"
        assert [d.index for d in info.disks] == [0, 1]
        for d in info.disks:
            image = source.images[point.seq][d.index]
            assert d.size_bytes == len(image)
            assert d.digest == plain_digest(image) == disks[d.index].expected.digest
            assert disk_bytes(site, info.vm_id, d.index) == image
            with open(d.location, "rb") as f:
                assert f.read() == image
            assert allocated(d.location) < len(image) // 2  # sparse: holes stayed holes
            assert d.method == ("sparse-copy" if isinstance(storage, LocalStorage) else "copy") or d.method == "clone"
        assert site.get_vm(info.vm_id) == info
        assert [v.vm_id for v in site.list_vms()] == [info.vm_id]
    assert steps[-1][1] == 1.0 and "running" in steps[-1][0]
    assert sum("verified" in text for text, _f in steps) >= 2
    # The recovered VM is a VM of a simulated VMware site like any other.
    with SimulatedSite(str(tmp_path / "recovery-site"), "admin", "secret-1") as as_source:
        vm = as_source.get_vm(info.vm_id)
        assert vm.power_state == "poweredOn" and [d.capacity_bytes for d in vm.disks] == [d.size_bytes for d in info.disks]
        assert as_source.disk_path(info.vm_id, vm.disks[1].key) == info.disks[1].location


def test_a_recovered_vm_runs_a_workload_and_neither_side_sees_the_others_writes(tmp_path):
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=2)
    point = applier.list_points()[0]
    snapshot_digest = storage.disk_digest(source.disk_specs()[0][0], snapshot=point.snapshots[0])
    with sim_site(tmp_path) as site:
        info = site.create_vm(name="db-01", network="recovery-net", disks=recovery_disks(applier, point.point_id))
        expected = {i: bytearray(source.images[point.seq][i]) for i in (0, 1)}
        keys = {d["key"]: d["index"] for d in site.site.read_state()["vms"][info.vm_id]["recovery"]["disks"]}

        def landed(vm_uuid, key, offset, data):
            assert vm_uuid == info.vm_id
            expected[keys[key]][offset : offset + len(data)] = data

        site.set_workload(info.vm_id, rate_bytes_per_s=512 * 1024, write_size=8192, pattern="uniform")
        now = [0.0]
        runner = WorkloadRunner(site.site, seed=7, clock=lambda: now[0], on_write=landed)
        try:
            written = 0
            for _ in range(20):
                now[0] += 0.1
                written += runner.step()
        finally:
            runner.close()
        assert written >= 512 * 1024
        for i in (0, 1):
            assert disk_bytes(site, info.vm_id, i) == bytes(expected[i])
            assert bytes(expected[i]) != source.images[point.seq][i]
        # The replica (live and at the point) did not see the VM's writes ...
        assert storage.disk_digest(source.disk_specs()[0][0], snapshot=point.snapshots[0]) == snapshot_digest
        assert b"".join(storage.iter_disk(source.disk_specs()[0][0])) == bytes(source.disks[0])
        # ... and replication going on into the replica does not reach the recovered disks.
        rng = random.Random(3)
        source.send([(0, 0, rng.randbytes(MiB)), (1, 0, rng.randbytes(2 * MiB))], dt_s=10)
        assert applier.apply_pending(crash_consistent_interval_s=1).ok
        assert b"".join(storage.iter_disk(source.disk_specs()[1][0])) == bytes(source.disks[1])
        for i in (0, 1):
            assert disk_bytes(site, info.vm_id, i) == bytes(expected[i])
    storage.close()


def test_a_disk_changed_before_verification_fails_the_recovery_and_leaves_nothing(tmp_path):
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=1)
    point = applier.list_points()[0]
    tampered = []

    def tamper(text: str, _fraction: float) -> None:
        if text.startswith("Disk 1: built"):
            path = site.site._disk_file(vm_dir_owner(), 2001)
            with open(path, "r+b") as f:
                f.seek(MiB + 600)
                f.write(b"\xff")
            tampered.append(path)

    def vm_dir_owner() -> str:
        (vm_id,) = os.listdir(tmp_path / "recovery-site" / "disks")
        return vm_id

    with sim_site(tmp_path) as site:
        with pytest.raises(VerificationFailed) as err:
            site.create_vm(name="app-01", network="recovery-net", disks=recovery_disks(applier, point.point_id),
                           progress=tamper)
        assert tampered
        assert "'app-01'" in str(err.value) and "Disk 1" in str(err.value)
        assert err.value.expected == plain_digest(source.images[point.seq][1])
        assert err.value.actual != err.value.expected
        assert site.list_vms() == []
        assert site.site.read_state()["vms"] == {}
        assert site_files(tmp_path) == []
        assert not os.listdir(tmp_path / "recovery-site" / "disks")
    # The replica is untouched, and the same recovery without interference succeeds.
    with sim_site(tmp_path) as site:
        info = site.create_vm(name="app-01", network="recovery-net", disks=recovery_disks(applier, point.point_id))
        assert disk_bytes(site, info.vm_id, 1) == source.images[point.seq][1]
    storage.close()


def test_changing_the_recovery_point_swaps_the_disks_and_removes_the_old_ones(tmp_path):
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=3)
    first, _, last = applier.list_points()
    with sim_site(tmp_path) as site:
        info = site.create_vm(name="web-02", network="recovery-net", disks=recovery_disks(applier, first.point_id))
        old_files = [d.location for d in info.disks]
        swapped = site.replace_disks(info.vm_id, recovery_disks(applier, last.point_id))
        assert swapped.vm_id == info.vm_id and swapped.power_state == "poweredOn"
        for i in (0, 1):
            assert disk_bytes(site, info.vm_id, i) == source.images[last.seq][i]
        assert not any(os.path.exists(p) for p in old_files)
        assert set(site_files(tmp_path)) == {os.path.relpath(d.location, tmp_path / "recovery-site" / "disks")
                                             for d in swapped.disks}
        # A mismatch while changing the point keeps the VM on its current disks.
        bad = recovery_disks(applier, first.point_id)

        def tamper(text: str, _fraction: float) -> None:
            if text.startswith("Disk 0: built"):
                vm = site.site.read_state()["vms"][info.vm_id]
                newest = max(d["key"] for d in vm["disks"]) + 1
                with open(site.site._disk_file(info.vm_id, newest), "r+b") as f:
                    f.write(b"\x01")

        with pytest.raises(VerificationFailed):
            site.replace_disks(info.vm_id, bad, progress=tamper)
        assert site.get_vm(info.vm_id) == swapped
        for i in (0, 1):
            assert disk_bytes(site, info.vm_id, i) == source.images[last.seq][i]
        assert len(site_files(tmp_path)) == 2
        site.destroy_vm(info.vm_id)
        site.destroy_vm(info.vm_id)  # gone is fine
        with pytest.raises(NotFound):
            site.get_vm(info.vm_id)
        assert site_files(tmp_path) == []
    storage.close()


def test_bad_requests_are_refused_with_a_sentence_and_change_nothing(tmp_path):
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=1)
    disks = recovery_disks(applier, applier.list_points()[0].point_id)
    with sim_site(tmp_path) as site:
        with pytest.raises(NotFound, match="no network 'prod-net'"):
            site.create_vm(name="x", network="prod-net", disks=disks)
        with pytest.raises(OperationFailed, match="at least one disk"):
            site.create_vm(name="x", network="test-net", disks=[])
        with pytest.raises(OperationFailed, match="VM name"):
            site.create_vm(name="a/b", network="test-net", disks=disks)
        with pytest.raises(OperationFailed, match="repeat"):
            site.create_vm(name="x", network="test-net", disks=[disks[0], disks[0]])
        assert site_files(tmp_path) == [] and site.list_vms() == []
        info = site.create_vm(name="x", network="test-net", disks=disks)
        with pytest.raises(OperationFailed, match="already exists"):
            site.create_vm(name="x", network="test-net", disks=disks)
        with pytest.raises(NotFound):
            list(site.read_disk(info.vm_id, 7))
        with pytest.raises(NotFound):
            site.replace_disks("no-such-vm", disks)
        assert [v.vm_id for v in site.list_vms()] == [info.vm_id] and len(site_files(tmp_path)) == 2
        # A VM of the site that no recovery made is never deleted through the recovery connector.
        other = site.site.create_vm(name="not-ours", host="esx-r01.recovery.sim.local", datastore="recovery-ds",
                                    disk_capacities_bytes=[MiB])
        with pytest.raises(OperationFailed, match="not made by a Lifeboat recovery"):
            site.destroy_vm(other.instance_uuid)
        assert site.site.get_vm(other.instance_uuid).name == "not-ours"
        with pytest.raises(NotFound):
            site.get_vm(other.instance_uuid)
    with pytest.raises(ConnectorError, match="Unknown recovery site kind"):
        open_recovery_site("hyperv", data_dir=str(tmp_path))
    with pytest.raises(ConnectorError, match="at least one network"):
        open_recovery_site("simulated", data_dir=str(tmp_path / "other"), networks=[])
    with pytest.raises(ConnectorError, match="workload .* not valid"):
        open_recovery_site("simulated", data_dir=str(tmp_path / "other"), workload={"rate_bytes_per_s": -1})
    assert not (tmp_path / "other").exists()
    storage.close()


# --- vSphere recovery site (vcsim) -------------------------------------------------------------


def vsphere_site(server, **kw):
    params = dict(host=server.host, port=server.port, username=server.user, password=server.password,
                  ca_file=server.ca_file, datacenter="DC0", datastore="LocalDS_0", placement="DC0_C0")
    params.update(kw)
    return open_recovery_site("vsphere", **params)


def datastore_url(server, path: str) -> str:
    query = urllib.parse.urlencode({"dcPath": "DC0", "dsName": "LocalDS_0"})
    return f"https://{server.host}:{server.port}/folder/{urllib.parse.quote(path)}?{query}"


def datastore_status(server, path: str) -> int:
    try:
        with urllib.request.urlopen(datastore_url(server, path), context=ssl.create_default_context(
                cafile=server.ca_file), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def vm_networks(site, vm_id: str) -> list[str]:
    vm = site.vc._find_vm(vm_id)
    return sorted(site.vc._prop(n, vim.Network, "name") for n in site.vc._prop(vm, vim.VirtualMachine, "network"))


@pytest.mark.peer
def test_vsphere_site_uploads_verifies_creates_and_powers_on(vcsim_factory, tmp_path):
    server = vcsim_factory()
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=2)
    point = applier.list_points()[0]
    with vsphere_site(server) as site:
        networks = site.networks()
        assert {"VM Network", "DC0_DVPG0"} <= set(networks)
        info = site.create_vm(name="web-01-test", network="VM Network", disks=recovery_disks(applier, point.point_id))
        assert info.power_state == "poweredOn" and info.network == "VM Network"
        assert [(d.index, d.method) for d in info.disks] == [(0, "upload"), (1, "upload")]
        for d in info.disks:
            assert d.location.startswith("[LocalDS_0] web-01-test/")
            # Downloaded back from the datastore over HTTP: the point's bytes.
            assert disk_bytes(site, info.vm_id, d.index) == source.images[point.seq][d.index]
            assert d.digest == plain_digest(source.images[point.seq][d.index])
        assert vm_networks(site, info.vm_id) == ["VM Network"]
        live = server.live_vm(info.vm_id)
        assert live["power_state"] == "poweredOn" and live["cluster"] == "DC0_C0"
        assert sorted(d["backing_file"] for d in live["disks"]) == sorted(d.location for d in info.disks)
        assert site.get_vm(info.vm_id) == info
        # A distributed port group works too.
        other = site.create_vm(name="web-02-test", network="DC0_DVPG0",
                               disks=recovery_disks(applier, point.point_id))
        assert vm_networks(site, other.vm_id) == ["DC0_DVPG0"]
        assert disk_bytes(site, other.vm_id, 1) == source.images[point.seq][1]
    storage.close()


@pytest.mark.peer
def test_vsphere_disk_changed_on_the_datastore_before_verification_leaves_nothing(vcsim_factory, tmp_path):
    server = vcsim_factory()
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=1)
    point = applier.list_points()[0]
    changed = []

    def tamper(text: str, _fraction: float) -> None:
        if text.startswith("Disk 0: uploaded"):
            image = bytearray(source.images[point.seq][0])
            image[4096] ^= 0xFF
            request = urllib.request.Request(datastore_url(server, "db-01/db-01_0-flat.vmdk"), data=bytes(image),
                                             method="PUT")
            context = ssl.create_default_context(cafile=server.ca_file)
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                assert response.status in (200, 201)
            changed.append(True)

    before = {vm["instance_uuid"] for vm in server.live_inventory()["vms"]}
    with vsphere_site(server) as site:
        with pytest.raises(VerificationFailed) as err:
            site.create_vm(name="db-01", network="VM Network", disks=recovery_disks(applier, point.point_id),
                           progress=tamper)
        assert changed and "'db-01'" in str(err.value) and "[LocalDS_0] db-01/db-01_0.vmdk" in str(err.value)
        assert {vm["instance_uuid"] for vm in server.live_inventory()["vms"]} == before
        assert datastore_status(server, "db-01/db-01_0-flat.vmdk") == 404
        assert datastore_status(server, "db-01/db-01_1-flat.vmdk") == 404
        # Unknown network: refused before anything is uploaded.
        with pytest.raises(NotFound, match="no network 'nope'"):
            site.create_vm(name="db-02", network="nope", disks=recovery_disks(applier, point.point_id))
        assert datastore_status(server, "db-02/db-02_0-flat.vmdk") == 404
    with pytest.raises(NotFound, match="no datastore"):
        with vsphere_site(server, datastore="NoSuchDS") as site:
            site.create_vm(name="db-03", network="VM Network", disks=recovery_disks(applier, point.point_id))
    storage.close()


@pytest.mark.peer
def test_vsphere_change_of_recovery_point_and_destroy(vcsim_factory, tmp_path):
    server = vcsim_factory()
    storage = LocalStorage(str(tmp_path / "storage"))
    source, applier = sparse_replica(storage, points=2)
    first, last = applier.list_points()
    with vsphere_site(server, placement="DC0_H0", datastore="") as site:
        info = site.create_vm(name="app-01", network="VM Network", disks=recovery_disks(applier, first.point_id))
        assert server.live_vm(info.vm_id)["host"] == "DC0_H0"
        old = [d.location for d in info.disks]
        swapped = site.replace_disks(info.vm_id, recovery_disks(applier, last.point_id))
        assert swapped.power_state == "poweredOn" and swapped.network == "VM Network"
        for i in (0, 1):
            assert disk_bytes(site, info.vm_id, i) == source.images[last.seq][i]
        live = server.live_vm(info.vm_id)
        assert sorted(d["backing_file"] for d in live["disks"]) == sorted(d.location for d in swapped.disks)
        for path in old:
            assert datastore_status(server, path.split("] ", 1)[1].replace(".vmdk", "-flat.vmdk")) == 404
        site.destroy_vm(info.vm_id)
        site.destroy_vm(info.vm_id)  # gone is fine
        assert server.live_vm(info.vm_id) is None
        foreign = server.inventory["vms"][0]["instance_uuid"]
        with pytest.raises(OperationFailed, match="not made by a Lifeboat recovery"):
            site.destroy_vm(foreign)
        assert server.live_vm(foreign) is not None
        for d in swapped.disks:
            assert datastore_status(server, d.location.split("] ", 1)[1].replace(".vmdk", "-flat.vmdk")) == 404
        with pytest.raises(NotFound):
            site.get_vm(info.vm_id)
    storage.close()


def test_extra_config_round_trip_is_json():
    # The recovery details a vSphere VM carries are plain JSON an admin can read in the vmx.
    from vault.connectors.recovery_vsphere import _extra

    options = _extra([{"index": 0, "size_bytes": 512, "location": "[ds] a/a_0.vmdk", "digest": "blake3:00",
                       "method": "upload"}], "net-1")
    assert options[0].key == "lifeboat.recovery.network" and options[0].value == "net-1"
    assert json.loads(options[1].value)["location"] == "[ds] a/a_0.vmdk"
