"""A vSphere recovery site, through pyVmomi and vSphere's datastore HTTP file interface.

Recovering a VM:

1. each disk's bytes are streamed from the replica snapshot to the datastore with an HTTP
   ``PUT https://<vcenter>/folder/<dir>/<file>-flat.vmdk?dcPath=<dc>&dsName=<ds>`` (the
   session cookie of the SOAP login authorizes it), next to a small VMDK descriptor that
   names it (``createType="vmfs"``, one flat extent): the layout of a thick VMFS disk;
2. each uploaded flat file is downloaded again with ``GET`` and its digest compared with the
   replica's at the point (nothing is trusted from the upload's side);
3. ``CreateVM_Task`` makes the VM with those disks attached (paravirtual SCSI), a vmxnet3
   NIC on the mapped port group (standard or distributed), and the recovery details in its
   ``extraConfig`` (``lifeboat.recovery.*``), then the VM is powered on.

On a mismatch or any error, the VM (if made) and the VM's folder are deleted again.
Changing the recovery point uploads and verifies new disk files first, then swaps them in
with one ``ReconfigVM_Task`` (the old disks are destroyed by it).

Limits: the datastore HTTP interface stores what it is sent, so every byte of a disk is
uploaded, zeros included (a thick disk): fine for the sizes Lifeboat's tests and demo use,
slow for big, mostly empty disks. vcsim (the simulator the tests use) serves ``/folder``
without checking the session cookie and does not mark distributed uplink port groups
(``config.uplink``), so they are listed among its networks; a real vCenter does both.
"""
from __future__ import annotations

import json
import logging
import math
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from pyVmomi import vim, vmodl

from replication.dataplane.recovery import RecoveryDisk, VerificationFailed, check_digest
from replication.dataplane.storage.base import ImageHasher
from vault.connectors.base import (
    POWERED_OFF,
    POWERED_ON,
    ConnectorError,
    NotFound,
    OperationFailed,
)
from vault.connectors.datastore_http import PIECE, DatastoreHttp
from vault.connectors.recovery import (
    Progress,
    RecoveredDisk,
    RecoveredVmInfo,
    RecoverySiteConnector,
    check_disks,
    check_request,
)
from vault.connectors.vsphere import (
    DISKS_PER_CONTROLLER,
    PropertyCollector,
    VSphereConnector,
    _ancestor,
    _spec,
    _TaskFault,
)

log = logging.getLogger(__name__)

UPLOAD_PIECE = PIECE
EXTRA_PREFIX = "lifeboat.recovery."


class _Carried(ConnectorError):
    """Carries a VerificationFailed through the connector's error translation unchanged."""

    def __init__(self, error: VerificationFailed) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Placement:
    datacenter: str
    datacenter_obj: Any
    datastore: str
    vm_folder: Any
    pool: Any
    host: Any  # a HostSystem, or None: the cluster places the VM (DRS)


class VSphereRecoverySite(RecoverySiteConnector):
    """A vCenter (or ESXi) where recovered VMs are created."""

    def __init__(
        self,
        *,
        host: str = "",
        port: int = 443,
        username: str = "",
        password: str = "",
        allow_untrusted: bool = False,
        thumbprint: str | None = None,
        datacenter: str = "",
        datastore: str = "",
        placement: str = "",
        cluster: str = "",
        host_name: str = "",
        ca_file: str | None = None,
        timeout: float = 30.0,
        user: str = "",
        connector: VSphereConnector | None = None,
        **_ignored: Any,
    ) -> None:
        # ``connector``: a session of the caller's to work in (it opens and closes it), for
        # the failback target, which builds new VMs on the on-premises vCenter this way.
        self._own_session = connector is None
        if connector is not None:
            self.vc = connector
        elif not host:
            raise ConnectorError("A vSphere recovery site needs the host name of its vCenter or ESXi server")
        else:
            self.vc = VSphereConnector(host=host, port=port, user=username or user, password=password,
                                       allow_untrusted=allow_untrusted, thumbprint=thumbprint or None,
                                       ca_file=ca_file, timeout=timeout)
        self.files = DatastoreHttp(self.vc)
        self.datacenter = datacenter
        self.datastore = datastore
        self.placement = placement or cluster or host_name
        self.where = self.vc.where

    def __repr__(self) -> str:
        return f"<VSphereRecoverySite {self.vc.host}:{self.vc.port}>"

    def connect(self) -> None:
        if self._own_session:
            self.vc.connect()

    @contextmanager
    def _task_errors(self, action: str) -> Iterator[None]:
        """The connector's error translation, letting VerificationFailed through as it is."""
        try:
            with self.vc._task_errors(action):
                try:
                    yield
                except VerificationFailed as exc:
                    raise _Carried(exc) from None
        except _Carried as carried:
            raise carried.error from None

    def close(self) -> None:
        if self._own_session:
            self.vc.close()

    # --- inventory -----------------------------------------------------------------------

    def _nodes(self) -> dict:
        return self.vc._tree_nodes([vim.HostSystem, vim.Datastore, vim.Network, vim.VirtualMachine])

    def _datacenter(self, nodes: dict) -> Any:
        dcs = [n for n in nodes.values() if n.kind == "Datacenter"]
        if self.datacenter:
            dcs = [n for n in dcs if n.name == self.datacenter]
            if not dcs:
                raise NotFound(f"{self.where} has no datacenter {self.datacenter!r}")
        elif len(dcs) != 1:
            names = ", ".join(sorted(n.name for n in dcs)) or "none"
            raise ConnectorError(f"{self.where} has several datacenters ({names}); say which one to recover into")
        return dcs[0]

    def _in_dc(self, nodes: dict, node: Any, dc_name: str) -> bool:
        return _ancestor(nodes, node.parent, "Datacenter") == dc_name

    def _network_objects(self, nodes: dict, dc_name: str) -> dict[str, Any]:
        kinds = ("Network", "DistributedVirtualPortgroup", "OpaqueNetwork")
        found = {n.name: n.obj for n in nodes.values() if n.kind in kinds and self._in_dc(nodes, n, dc_name)}
        portgroups = [obj for obj in found.values() if isinstance(obj, vim.dvs.DistributedVirtualPortgroup)]
        if portgroups:
            props = self.vc._properties(portgroups, [_spec(vim.dvs.DistributedVirtualPortgroup, "config.uplink")])
            uplinks = {obj._moId for obj, p in props if p.get("config.uplink")}
            found = {name: obj for name, obj in found.items() if obj._moId not in uplinks}
        return found

    def networks(self) -> list[str]:
        with self.vc._doing("Listing the networks"):
            nodes = self._nodes()
            return sorted(self._network_objects(nodes, self._datacenter(nodes).name))

    def _place(self, nodes: dict, action: str) -> _Placement:
        dc = self._datacenter(nodes)
        stores = sorted(n.name for n in nodes.values() if n.kind == "Datastore" and self._in_dc(nodes, n, dc.name))
        if self.datastore:
            if self.datastore not in stores:
                raise NotFound(f"{action} failed: datacenter {dc.name} has no datastore {self.datastore!r}")
            datastore = self.datastore
        elif len(stores) == 1:
            datastore = stores[0]
        else:
            raise ConnectorError(f"{action} failed: say which datastore of {dc.name} to use ({', '.join(stores)})")
        computes = [n for n in nodes.values() if n.kind in ("ClusterComputeResource", "ComputeResource")
                    and self._in_dc(nodes, n, dc.name)]
        host_obj = None
        if self.placement:
            hosts = [n for n in nodes.values() if n.kind == "HostSystem" and n.name == self.placement
                     and self._in_dc(nodes, n, dc.name)]
            clusters = [n for n in computes if n.kind == "ClusterComputeResource" and n.name == self.placement]
            if hosts:
                host_obj = hosts[0].obj
                compute = nodes.get(hosts[0].parent or "")
            elif clusters:
                compute = clusters[0]
            else:
                raise NotFound(f"{action} failed: datacenter {dc.name} has no host or cluster {self.placement!r}")
        else:
            if not computes:
                raise NotFound(f"{action} failed: datacenter {dc.name} has no host or cluster")
            compute = sorted(computes, key=lambda n: n.name)[0]
        if compute is None:
            raise OperationFailed(f"{action} failed: cannot tell where host {self.placement} belongs")
        pool = self.vc._prop(compute.obj, vim.ComputeResource, "resourcePool")
        folder = self.vc._prop(dc.obj, vim.Datacenter, "vmFolder")
        return _Placement(dc.name, dc.obj, datastore, folder, pool, host_obj)

    # --- datastore files -----------------------------------------------------------------

    def _put(self, place: _Placement, path: str, body: Any, length: int, action: str) -> None:
        self.files.put(place.datacenter, place.datastore, path, body, length, action=action)

    def _get(self, place: _Placement, path: str, action: str) -> Iterator[bytes]:
        return self.files.get(place.datacenter, place.datastore, path, action=action)

    def _exists(self, place: _Placement, path: str) -> bool:
        return self.files.exists(place.datacenter, place.datastore, path)

    def _delete_folder(self, place: _Placement, folder: str) -> None:
        """Delete the folder with every file in it; a folder already gone is fine."""
        fm = self.vc.content.fileManager
        try:
            task = fm.DeleteDatastoreFile_Task(name=f"[{place.datastore}] {folder}", datacenter=place.datacenter_obj)
            self.vc._wait(task, f"Deleting folder {folder}")
        except _TaskFault as exc:
            if not isinstance(exc.fault, vim.fault.FileNotFound):
                log.warning("Deleting [%s] %s on %s failed: %s", place.datastore, folder, self.where, exc.fault)
        except Exception as exc:  # clean-up is best effort; the caller reports the first error
            log.warning("Deleting [%s] %s on %s failed: %s", place.datastore, folder, self.where, exc)

    def _upload_disk(self, place: _Placement, folder: str, base: str, disk: RecoveryDisk, vm_name: str,
                     progress: Progress | None, done: list[int], total: int) -> dict[str, Any]:
        """Upload one disk (flat file + descriptor), download it again and check its digest."""
        action = f"Uploading disk {disk.index} of recovered VM {vm_name!r} to {self.where}"
        flat = f"{folder}/{base}-flat.vmdk"
        pieces = disk.storage.iter_disk(disk.disk_name, snapshot=disk.snapshot, chunk_bytes=UPLOAD_PIECE)
        self._put(place, flat, pieces, disk.size_bytes, action)
        self._put(place, f"{folder}/{base}.vmdk", _descriptor(base, disk.size_bytes),
                  len(_descriptor(base, disk.size_bytes)), action)
        if progress is not None:
            progress(f"Disk {disk.index}: uploaded, verifying", done[0] / total)
        hasher = ImageHasher()
        for piece in self._get(place, flat, f"Reading back disk {disk.index} of recovered VM {vm_name!r}"):
            hasher.update(piece)
        if hasher.length != disk.size_bytes:
            raise OperationFailed(f"Disk {disk.index} of recovered VM {vm_name!r} reads back as {hasher.length} "
                                  f"bytes from {self.where}, not {disk.size_bytes}")
        location = f"[{place.datastore}] {folder}/{base}.vmdk"
        check_digest(vm=vm_name, disk=disk, actual=hasher.digest(), location=location)
        done[0] += disk.size_bytes
        if progress is not None:
            progress(f"Disk {disk.index}: verified", done[0] / total)
        return {"index": disk.index, "size_bytes": disk.size_bytes, "location": location, "digest": hasher.digest(),
                "method": "upload"}

    # --- VMs -----------------------------------------------------------------------------

    def create_vm(
        self,
        *,
        name: str,
        network: str,
        disks: Sequence[RecoveryDisk],
        guest_os: str = "otherGuest64",
        progress: Progress | None = None,
        power_on: bool = True,
    ) -> RecoveredVmInfo:
        """As the recovery site's ``create_vm``; with ``power_on=False`` the verified VM is
        left off (a failback to a new VM on the on-premises side is started by the admin)."""
        action = f"Recovering VM {name!r} on {self.where}"
        with self._task_errors(action):
            nodes = self._nodes()
            place = self._place(nodes, action)
            nets = self._network_objects(nodes, place.datacenter)
            check_request(name=name, network=network, disks=disks, known_networks=sorted(nets), where=self.where)
            disks = sorted(disks, key=lambda d: d.index)
            if any(n.kind == "VirtualMachine" and n.name == name for n in nodes.values()):
                raise OperationFailed(f"{action} failed: the name {name!r} already exists")
            if self.vc.content.searchIndex.FindChild(place.vm_folder, name) is not None:
                raise OperationFailed(f"{action} failed: the name {name!r} already exists")
            folder = name if not self._exists(place, f"{name}/") else f"{name}-{secrets.token_hex(3)}"
            total = sum(d.size_bytes for d in disks) or 1
            done = [0]
            vm = None
            try:
                records = [self._upload_disk(place, folder, f"{name}_{d.index}", d, name, progress, done, total)
                           for d in disks]
                spec = _vm_spec(name=name, guest_os=guest_os, datastore=place.datastore, folder=folder,
                                records=records, nic=self._nic_backing(nets[network]), network=network)
                vm = self.vc._wait(place.vm_folder.CreateVM_Task(config=spec, pool=place.pool, host=place.host),
                                   action)
                if power_on:
                    self.vc._wait(vm.PowerOnVM_Task(), f"Powering on recovered VM {name!r}")
                vm_id = self.vc._prop(vm, vim.VirtualMachine, "config.instanceUuid")
            except BaseException:
                if vm is not None:
                    self._destroy(vm, action)
                self._delete_folder(place, folder)
                raise
        if progress is not None:
            state = "running" if power_on else "ready (powered off)"
            progress(f"VM {name} is {state} with {len(disks)} verified disk(s)", 1.0)
        return self.get_vm(vm_id)

    def _nic_backing(self, net: Any) -> Any:
        if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
            props = dict(self.vc._properties([net], [_spec(vim.dvs.DistributedVirtualPortgroup, "key",
                                                           "config.distributedVirtualSwitch")])[0][1])
            switch = props["config.distributedVirtualSwitch"]
            uuid = self.vc._prop(switch, vim.DistributedVirtualSwitch, "uuid")
            return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(portgroupKey=props["key"], switchUuid=uuid))
        name = self.vc._prop(net, vim.Network, "name")
        return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=name, network=net)

    def _vm_props(self, vm_id: str) -> tuple[Any, dict[str, Any]]:
        vm = self.vc._find_vm(vm_id)
        fetched = self.vc._properties([vm], [PropertyCollector.PropertySpec(
            type=vim.VirtualMachine, pathSet=["name", "runtime.powerState", "config.extraConfig",
                                              "config.hardware.device", "config.files.vmPathName"])])
        if not fetched:
            raise NotFound(f"No VM with instance UUID {vm_id} on {self.where}")
        return vm, fetched[0][1]

    def _recovery_config(self, vm_id: str, props: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        extra = {o.key: o.value for o in props.get("config.extraConfig") or []}
        if f"{EXTRA_PREFIX}network" not in extra:
            raise NotFound(f"VM {vm_id} on {self.where} was not recovered by Lifeboat")
        disks = [json.loads(v) for k, v in extra.items() if k.startswith(f"{EXTRA_PREFIX}disk") and v]
        return extra[f"{EXTRA_PREFIX}network"], sorted(disks, key=lambda d: d["index"])

    def get_vm(self, vm_id: str) -> RecoveredVmInfo:
        with self.vc._doing(f"Reading recovered VM {vm_id}"):
            _vm, props = self._vm_props(vm_id)
            network, disks = self._recovery_config(vm_id, props)
            return RecoveredVmInfo(
                vm_id=vm_id, name=props["name"], network=network, power_state=str(props["runtime.powerState"]),
                disks=tuple(RecoveredDisk(index=d["index"], size_bytes=d["size_bytes"], location=d["location"],
                                          digest=d["digest"], method=d["method"]) for d in disks),
            )

    def replace_disks(
        self, vm_id: str, disks: Sequence[RecoveryDisk], progress: Progress | None = None
    ) -> RecoveredVmInfo:
        info = self.get_vm(vm_id)
        action = f"Changing the recovery point of VM {info.name!r} on {self.where}"
        check_disks(disks, action=action)
        disks = sorted(disks, key=lambda d: d.index)
        with self._task_errors(action):
            vm, props = self._vm_props(vm_id)
            place = self._place(self._nodes(), action)
            folder = props["config.files.vmPathName"].split("] ", 1)[-1].rsplit("/", 1)[0]
            was_on = info.power_state == POWERED_ON
            self.power_off(vm_id)
            token = secrets.token_hex(3)
            total = sum(d.size_bytes for d in disks) or 1
            done = [0]
            uploaded: list[str] = []
            try:
                records = []
                for d in disks:
                    base = f"{info.name}_{d.index}_{token}"
                    uploaded += [f"{folder}/{base}.vmdk"]
                    records.append(self._upload_disk(place, folder, base, d, info.name, progress, done, total))
                devices = props.get("config.hardware.device") or []
                old = [dev for dev in devices if isinstance(dev, vim.vm.device.VirtualDisk)]
                controllers = sorted((dev for dev in devices if isinstance(dev, vim.vm.device.VirtualSCSIController)),
                                     key=lambda c: c.busNumber)
                changes = [vim.vm.device.VirtualDeviceSpec(
                    operation=vim.vm.device.VirtualDeviceSpec.Operation.remove,
                    fileOperation=vim.vm.device.VirtualDeviceSpec.FileOperation.destroy, device=dev) for dev in old]
                changes += _disk_changes(records, place.datastore, [c.key for c in controllers])
                extra = [vim.option.OptionValue(key=f"{EXTRA_PREFIX}disk{d.index}", value="") for d in info.disks]
                extra += _extra(records, info.network)
                spec = vim.vm.ConfigSpec(deviceChange=changes, extraConfig=extra)
                self.vc._wait(vm.ReconfigVM_Task(spec=spec), action)
            except BaseException:
                for path in uploaded:
                    self._delete_file(place, path)
                if was_on:
                    try:
                        self.power_on(vm_id)  # the old disks are untouched
                    except ConnectorError:
                        pass
                raise
            self.vc._wait(vm.PowerOnVM_Task(), f"Powering on recovered VM {info.name!r}")
        if progress is not None:
            progress(f"VM {info.name} is running with {len(disks)} verified disk(s)", 1.0)
        return self.get_vm(vm_id)

    def _delete_file(self, place: _Placement, path: str) -> None:
        """Delete a disk (descriptor and flat file); best effort."""
        try:
            task = self.vc.content.virtualDiskManager.DeleteVirtualDisk_Task(
                name=f"[{place.datastore}] {path}", datacenter=place.datacenter_obj)
            self.vc._wait(task, f"Deleting {path}")
        except Exception as exc:  # clean-up is best effort; the caller reports the first error
            log.warning("Deleting [%s] %s on %s failed: %s", place.datastore, path, self.where, exc)

    def power_off(self, vm_id: str) -> None:
        self.vc.power_off(vm_id)

    def power_on(self, vm_id: str) -> None:
        self.vc.power_on(vm_id)

    def _destroy(self, vm: Any, action: str) -> None:
        try:
            if self.vc._prop(vm, vim.VirtualMachine, "runtime.powerState") != POWERED_OFF:
                try:
                    self.vc._wait(vm.PowerOffVM_Task(), action)
                except _TaskFault:
                    pass
            self.vc._wait(vm.Destroy_Task(), action)
        except (_TaskFault, vmodl.fault.ManagedObjectNotFound):
            pass
        except Exception as exc:  # clean-up is best effort; the caller reports the first error
            log.warning("Deleting VM on %s failed: %s", self.where, exc)

    def destroy_vm(self, vm_id: str) -> None:
        action = f"Deleting recovered VM {vm_id}"
        with self._task_errors(action):
            try:
                vm, props = self._vm_props(vm_id)
            except NotFound:
                return
            extra = {o.key for o in props.get("config.extraConfig") or []}
            if f"{EXTRA_PREFIX}network" not in extra:
                raise OperationFailed(f"{action} refused: VM {props.get('name', vm_id)!r} was not made by a "
                                      "Lifeboat recovery")
            folder = props["config.files.vmPathName"].split("] ", 1)[-1].rsplit("/", 1)[0]
            if self.vc._prop(vm, vim.VirtualMachine, "runtime.powerState") != POWERED_OFF:
                try:
                    self.vc._wait(vm.PowerOffVM_Task(), action)
                except _TaskFault as exc:
                    if not isinstance(exc.fault, vim.fault.InvalidPowerState):
                        raise
            self.vc._wait(vm.Destroy_Task(), action)
            place = self._place(self._nodes(), action)
            if folder:
                self._delete_folder(place, folder)

    def read_disk(self, vm_id: str, index: int) -> Iterator[bytes]:
        info = self.get_vm(vm_id)
        disk = next((d for d in info.disks if d.index == index), None)
        if disk is None:
            raise NotFound(f"Recovered VM {vm_id} on {self.where} has no disk {index}")
        with self.vc._doing(f"Reading disk {index} of recovered VM {vm_id}"):
            place = self._place(self._nodes(), f"Reading disk {index} of recovered VM {vm_id}")
        path = _flat_path(disk.location)
        return self._get(place, path, f"Reading disk {index} of recovered VM {info.name!r}")


def _flat_path(location: str) -> str:
    """'[ds] dir/name.vmdk' -> 'dir/name-flat.vmdk' (the extent the descriptor names)."""
    path = location.split("] ", 1)[1]
    return path[: -len(".vmdk")] + "-flat.vmdk"


def _descriptor(base: str, size_bytes: int) -> bytes:
    """A VMDK descriptor for one flat extent (the text file vSphere reads to open the disk)."""
    sectors = size_bytes // 512
    cylinders = max(1, min(65535, sectors // (255 * 63)))
    cid = secrets.token_hex(4)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{base}-flat.vmdk"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.virtualHWVersion = "13"\n'
    ).encode()


def _extra(records: list[dict[str, Any]], network: str) -> list[Any]:
    out = [vim.option.OptionValue(key=f"{EXTRA_PREFIX}network", value=network)]
    for r in records:
        out.append(vim.option.OptionValue(key=f"{EXTRA_PREFIX}disk{r['index']}", value=json.dumps(r, sort_keys=True)))
    return out


def _disk_changes(records: list[dict[str, Any]], datastore: str, controller_keys: list[int]) -> list[Any]:
    """Device changes attaching the uploaded disks (and the SCSI controllers they need)."""
    changes = []
    keys = list(controller_keys)
    needed = math.ceil(len(records) / DISKS_PER_CONTROLLER)
    for bus in range(len(keys), needed):
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
            device=vim.vm.device.ParaVirtualSCSIController(
                key=-100 - bus, busNumber=bus, sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing),
        ))
        keys.append(-100 - bus)
    for i, r in enumerate(records):
        bus, slot = divmod(i, DISKS_PER_CONTROLLER)
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
            device=vim.vm.device.VirtualDisk(
                key=-200 - i,
                controllerKey=keys[bus],
                unitNumber=slot if slot < 7 else slot + 1,  # unit 7 is the controller's own
                capacityInKB=math.ceil(r["size_bytes"] / 1024),
                capacityInBytes=r["size_bytes"],
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=r["location"], diskMode="persistent"),
            ),
        ))
    return changes


def _vm_spec(*, name: str, guest_os: str, datastore: str, folder: str, records: list[dict[str, Any]], nic: Any,
             network: str) -> Any:
    changes = _disk_changes(records, datastore, [])
    changes.append(vim.vm.device.VirtualDeviceSpec(
        operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
        device=vim.vm.device.VirtualVmxnet3(
            key=-300, backing=nic,
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True,
                                                                connected=True)),
    ))
    return vim.vm.ConfigSpec(
        name=name,
        guestId=guest_os,
        numCPUs=1,
        memoryMB=1024,
        files=vim.vm.FileInfo(vmPathName=f"[{datastore}] {folder}/{name}.vmx"),
        deviceChange=changes,
        extraConfig=_extra(records, network),
    )
