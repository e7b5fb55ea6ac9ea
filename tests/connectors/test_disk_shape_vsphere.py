"""Disks that change shape, discovery side, against a real vCenter simulator (vcsim): a disk
grown and a disk added with ReconfigVM_Task show up in discovery and in the machine's disks,
and a protected item follows (the added disk becomes a replica disk in the agent's
assignment, the growth is an event); a disk removed stops being replicated, with an event
and an alert. The replication side of the same changes is tested end to end on the
simulated site (tests/e2e/test_disk_shape.py)."""
from __future__ import annotations

import math

import pytest
from pyVmomi import vim

from replication.agents import agent_assignment, agent_register
from replication.choices import ProtectionState
from replication.models import MobilityAgent
from tests.factories import ProtectedItemFactory, ReplicaDiskFactory, VaultFactory
from vault.discovery import connector_for, machines_upsert
from vault.models import Alert, DiscoveredMachine, Event, ProcessServer
from vault.services import vcenter_create

pytestmark = [pytest.mark.peer, pytest.mark.django_db(transaction=True)]

MiB = 1024 * 1024


def _discover(vcenter):
    """(inventory, the connector still connected: the caller closes it)."""
    connector = connector_for(vcenter)
    connector.connect()
    return connector.discover(), connector


def _reconfigure(connector, vm_uuid: str, change) -> None:
    vm = connector._find_vm(vm_uuid)
    connector._wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])), "reconfiguring the test VM")


def _disk(connector, vm_uuid: str, key: int):
    vm = connector._find_vm(vm_uuid)
    return next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk) and d.key == key)


def _grow(connector, vm_uuid: str, key: int, size: int) -> None:
    disk = _disk(connector, vm_uuid, key)
    disk.capacityInKB, disk.capacityInBytes = math.ceil(size / 1024), size
    _reconfigure(connector, vm_uuid, vim.vm.device.VirtualDeviceSpec(
        operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=disk))


def _add(connector, vm_uuid: str, size: int, datastore: str) -> None:
    first = _disk(connector, vm_uuid, min(d.key for d in connector._find_vm(vm_uuid).config.hardware.device
                                          if isinstance(d, vim.vm.device.VirtualDisk)))
    used = {d.unitNumber for d in connector._find_vm(vm_uuid).config.hardware.device
            if getattr(d, "controllerKey", None) == first.controllerKey}
    _reconfigure(connector, vm_uuid, vim.vm.device.VirtualDeviceSpec(
        operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
        fileOperation=vim.vm.device.VirtualDeviceSpec.FileOperation.create,
        device=vim.vm.device.VirtualDisk(
            key=-1, controllerKey=first.controllerKey, unitNumber=next(u for u in range(16) if u not in used and u != 7),
            capacityInKB=math.ceil(size / 1024), capacityInBytes=size,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=f"[{datastore}]", diskMode="persistent",
                                                                  thinProvisioned=True))))


def _remove(connector, vm_uuid: str, key: int) -> None:
    _reconfigure(connector, vm_uuid, vim.vm.device.VirtualDeviceSpec(
        operation=vim.vm.device.VirtualDeviceSpec.Operation.remove, device=_disk(connector, vm_uuid, key)))


def test_disks_grown_added_and_removed_in_vcenter_reach_the_protected_item(vcsim_factory):
    server = vcsim_factory(cluster=1, host=1, standalone_host=0, vm=1)
    vault = VaultFactory()
    vcenter = vcenter_create(vault=vault, name="vcsim", host=server.host, port=server.port, username=server.user,
                             password=server.password, thumbprint=server.thumbprint_sha256)
    inventory, connector = _discover(vcenter)
    try:
        machines_upsert(vcenter=vcenter, vms=inventory.vms)
        vm = inventory.vms[0]
        machine = DiscoveredMachine.objects.get(vcenter=vcenter, instance_uuid=vm.instance_uuid)
        first = min(vm.disks, key=lambda d: d.key)
        # Protected, with its agent installed by hand (it reports where it reads each disk).
        item = ProtectedItemFactory(vault=vault, machine=machine, protection_state=ProtectionState.PROTECTED)
        ProcessServer.objects.filter(pk=item.process_server_id).update(thumbprint="ab" * 32)  # it reported its certificate
        replica = ReplicaDiskFactory(item=item, index=0, source_disk_key=first.key, capacity_bytes=first.capacity_bytes,
                                     source_path="/dev/sdb")
        registered = agent_register(vault=vault, hostname=vm.name, machine={
            "name": vm.name, "instance_uuid": vm.instance_uuid,
            "disks": [{"key": d.key, "path": f"/dev/sd{chr(98 + i)}", "capacity_bytes": d.capacity_bytes}
                      for i, d in enumerate(sorted(vm.disks, key=lambda d: d.key))]})
        extra = [d for d in vm.disks if d.key != first.key]  # vcsim's VMs may come with more than one disk
        for i, d in enumerate(extra, start=1):
            ReplicaDiskFactory(item=item, index=i, source_disk_key=d.key, capacity_bytes=d.capacity_bytes)

        # vCenter: the first disk grows by 64 MiB and a 32 MiB disk is added.
        _grow(connector, vm.instance_uuid, first.key, first.capacity_bytes + 64 * MiB)
        _add(connector, vm.instance_uuid, 32 * MiB, first.datastore)
        seen = connector.get_vm(vm.instance_uuid)
        summary = machines_upsert(vcenter=vcenter, vms=connector.discover().vms)
    finally:
        connector.close()

    # discovery: the machine's disks are vCenter's
    assert summary["disks_new"] == 1 and summary["disks_changed"] >= 1
    disks = {d.key: d.capacity_bytes for d in machine.disks.all()}
    assert disks == {d.key: d.capacity_bytes for d in seen.disks}
    assert disks[first.key] == first.capacity_bytes + 64 * MiB
    added_key = next(k for k in disks if k not in {d.key for d in vm.disks})
    assert disks[added_key] == 32 * MiB

    # the protected item: the added disk is a new replica disk (its agent path from the
    # agent's registration), in the agent's assignment; the growth is an event (the agent
    # grows the replica at the right point of its stream)
    # its agent was installed by hand: the new disk is replicated once the agent says where
    # it reads it (registering again, with every disk)
    assert not item.replica_disks.filter(source_disk_key=added_key).exists()
    assert "register the agent again" in Event.objects.get(protected_item=item, kind="disk_added").message
    agent_register(vault=vault, hostname=vm.name, token=registered.token, machine={  # the agent itself, with its token
        "name": vm.name, "instance_uuid": vm.instance_uuid,
        "disks": [{"key": first.key, "path": "/dev/sdb", "capacity_bytes": first.capacity_bytes + 64 * MiB},
                  {"key": added_key, "path": "/dev/sdc", "capacity_bytes": 32 * MiB}]})
    added = item.replica_disks.get(source_disk_key=added_key)
    assert added.index == len(extra) + 1 and added.capacity_bytes == 32 * MiB and added.removed_at is None
    assignment = agent_assignment(agent=MobilityAgent.objects.get(machine=machine))["items"][0]
    assert {d["key"] for d in assignment["disks"]} == {str(k) for k in disks}
    assert Event.objects.filter(protected_item=item, kind="disk_added", severity="INFO").exists()
    assert Event.objects.filter(protected_item=item, kind="disk_grown").exists()
    replica.refresh_from_db()
    assert replica.capacity_bytes == first.capacity_bytes  # the replica's size follows apply, not discovery
    item.refresh_from_db()
    assert item.protection_state == ProtectionState.PROTECTED  # nothing is re-seeded

    # vCenter: the added disk is removed again; its replication stops, with an event and an alert
    inventory, connector = _discover(vcenter)
    try:
        _remove(connector, vm.instance_uuid, added_key)
        summary = machines_upsert(vcenter=vcenter, vms=connector.discover().vms)
    finally:
        connector.close()
    assert summary["disks_removed"] == 1
    added.refresh_from_db()
    assert added.removed_at is not None
    assignment = agent_assignment(agent=MobilityAgent.objects.get(machine=machine))["items"][0]
    assert str(added_key) not in {d["key"] for d in assignment["disks"]}
    assert Event.objects.filter(protected_item=item, kind="disk_removed").exists()
    alert = Alert.objects.get(protected_item=item, kind="disk_removed")
    assert alert.state == "ACTIVE" and "removed" in alert.message
    item.refresh_from_db()
    assert item.protection_state == ProtectionState.PROTECTED
