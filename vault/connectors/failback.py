"""Failback targets: the on-premises side that a failed-over VM's data comes back to.

After a failover the VM runs at the recovery site; failing back writes its disks, as a
replica snapshot holds them (``replication.dataplane.recovery.RecoveryDisk``), to the
on-premises side, either

* into the **original VM** (:meth:`FailbackTarget.restore_vm`): the VM must exist and be
  powered off, and each given disk of it is overwritten with the image; or
* into a **new VM at an alternate location** (:meth:`FailbackTarget.create_vm`): another
  host and datastore of the same vCenter, or another vCenter, left powered off.

As on the recovery side, nothing is trusted that was not read back: each disk is written,
read back *from where it was written* and its digest compared with the replica's
(``VerificationFailed`` on a mismatch). A VM is never powered on here; the caller does that
(:meth:`FailbackTarget.power_on`) once it is done.

Two kinds, opened with :func:`vault.connectors.sites.open_failback_target`:

* ``"simulated"`` (:class:`SimulatedFailbackTarget`): a simulated site in a directory.
  Restoring exports each image into a new file beside the VM's disk file, verifies and
  fsyncs it, and only then renames it over the disk file: a failure (a mismatch, a VM
  powered on meanwhile, a full disk) leaves every original disk as it was. The disk's write
  journal is marked as not covering the change (``OVERFLOW`` with the reason), so an agent
  that replicates the disk resynchronizes it instead of trusting the journal, and the
  site's workload runner notices the new file and writes to it once the VM is on.
* ``"vcenter"`` (:class:`VSphereFailbackTarget`): restoring uploads the image over the
  datastore HTTP interface to the flat file the disk's descriptor names, downloads it again
  and compares. The datastore interface cannot replace a file atomically, so a restore that
  fails midway leaves that disk partly written (the VM stays off; restoring again repairs
  it). A new VM is built like a recovered VM (``VSphereRecoverySite``, uploaded disks) on
  the given host and datastore, and left off.

Disks are named by their vSphere device key (2000, 2001, ... on the first SCSI controller);
``RestoredDisk.index`` is the disk's position among the VM's disks in key order.
"""
from __future__ import annotations

import os
import posixpath
import re
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Generator, Iterator, Mapping, Sequence

from pyVmomi import vim

from mobility.durable import fsync_dir, replace_durably, temp_path, unlink_quietly
from mobility.filter import OVERFLOW
from replication.dataplane.recovery import RecoveryDisk, VerificationFailed, check_digest
from replication.dataplane.storage import StorageError
from replication.dataplane.storage.base import ImageHasher, digest_flat_file
from vault.connectors.base import (
    POWERED_OFF,
    ConnectorError,
    DiskInfo,
    NotFound,
    OperationFailed,
    Session,
    VmInfo,
)
from vault.connectors.datastore_http import DESCRIPTOR_MAX, PIECE, DatastoreHttp, parse_extents
from vault.connectors.recovery import Progress, check_disks
from vault.connectors.recovery_vsphere import VSphereRecoverySite
from vault.connectors.simulated import SimulatedSite, disk_file, journal_path
from vault.connectors.vsphere import VSphereConnector, _ancestor, _spec

__all__ = [
    "DEFAULT_NETWORKS",
    "FailbackTarget",
    "Progress",
    "RestoredDisk",
    "RestoredVm",
    "SimulatedFailbackTarget",
    "VerificationFailed",
    "VSphereFailbackTarget",
]

# The networks a simulated site offers when its site.json names none (a source site's).
DEFAULT_NETWORKS = ("VM Network",)
DISK_WORKERS = 2  # disks of one VM written at once on the simulated site (each export and hash uses all cores)
SECTOR = 512
_ZEROS = bytes(PIECE)


@dataclass(frozen=True, slots=True)
class RestoredDisk:
    key: int  # the disk's device key in the VM
    index: int  # its position among the VM's disks in key order
    size_bytes: int  # the disk's capacity
    location: str  # a file path (simulated) or the disk's datastore path "[ds] dir/name.vmdk"
    digest: str  # read back after it was written; "" for a disk not written by this call
    method: str  # how it was written ("clone", "sparse-copy", "copy", "upload"); "" when not written


@dataclass(frozen=True, slots=True)
class RestoredVm:
    vm_uuid: str
    name: str
    host: str
    datastore: str  # the datastore of the VM's first disk
    power_state: str
    disks: tuple[RestoredDisk, ...]


class FailbackTarget(Session):
    """A connection to the on-premises side of a failback (errors: the ConnectorError
    subclasses, and ``VerificationFailed`` for a disk that reads back wrong)."""

    where: str

    @abstractmethod
    def vm(self, vm_uuid: str) -> RestoredVm:
        """A VM and its disks (``digest`` empty); ``NotFound`` if it is not there."""

    @abstractmethod
    def restore_vm(self, vm_uuid: str, disks: Mapping[int, RecoveryDisk],
                   progress: Progress | None = None) -> RestoredVm:
        """Write each image into the disk of that key of the existing, powered-off VM, read
        it back and verify it. Refused before anything is written when the VM is not
        powered off, a key is not a disk of the VM or a disk is smaller than its image. A
        disk bigger than its image reads as zeros past it. Does not power the VM on."""

    @abstractmethod
    def create_vm(self, *, name: str, host: str, datastore: str, network: str, disks: Sequence[RecoveryDisk],
                  progress: Progress | None = None) -> RestoredVm:
        """A new VM on ``host`` with its disks on ``datastore`` and a NIC on ``network``,
        every disk built from its image and verified; left powered off. Refused before
        anything is made when the name exists or the host, datastore or network does not."""

    @abstractmethod
    def power_on(self, vm_uuid: str) -> None:
        """Power on; nothing happens if it is already on."""

    @abstractmethod
    def power_off(self, vm_uuid: str) -> None:
        """Hard power-off; nothing happens if it is already off."""

    @abstractmethod
    def disk_source(self, vm_uuid: str, key: int) -> str | Iterator[bytes]:
        """The disk's current bytes, to seed a replica from: a flat file path, or the whole
        disk (its capacity) as pieces downloaded from the datastore."""

    @abstractmethod
    def networks(self) -> list[str]:
        """The networks a new VM can be attached to."""

    @abstractmethod
    def hosts(self) -> list[str]:
        """The hosts a new VM can be placed on."""

    @abstractmethod
    def datastores(self) -> list[str]:
        """The datastores a new VM's disks can be put on."""

    @abstractmethod
    def vm_names(self) -> list[str]:
        """The names of the site's VMs (a new VM's name must be none of them)."""

    @abstractmethod
    def destroy_vm(self, vm_uuid: str) -> None:
        """Delete a VM ``create_vm`` made (a failback that failed after making it), with its
        disks; a VM already gone is fine."""


# --- checks both kinds make -----------------------------------------------------------------


def check_restore(info: VmInfo, disks: Mapping[int, RecoveryDisk], *, action: str) -> list[tuple[DiskInfo, RecoveryDisk]]:
    """The (VM disk, image) pairs to write, in key order; raises before anything is written."""
    if info.power_state != POWERED_OFF:
        raise OperationFailed(f"{action} refused: the VM is {info.power_state}; power it off first "
                              "(its disks are only written while it is off)")
    if not disks:
        raise OperationFailed(f"{action} failed: no disk to restore was given")
    by_key = {d.key: d for d in info.disks}
    plan = []
    for key in sorted(disks, key=str):
        image = disks[key]
        if not isinstance(image, RecoveryDisk):
            raise TypeError(f"{action}: disks must map disk keys to RecoveryDisk, not {type(image).__name__}")
        target = by_key.get(key) if isinstance(key, int) and not isinstance(key, bool) else None
        if target is None:
            known = ", ".join(str(k) for k in sorted(by_key)) or "none"
            raise NotFound(f"{action} failed: the VM has no disk {key!r} (its disks: {known})")
        if target.capacity_bytes < image.size_bytes:
            raise OperationFailed(
                f"{action} refused: disk {key} ({target.label}) holds {target.capacity_bytes} bytes, less than the "
                f"{image.size_bytes} bytes to restore into it; grow it first")
        plan.append((target, image))
    return sorted(plan, key=lambda pair: pair[0].key)


def check_name(name: str, *, action: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > 80 or any(c in name for c in "/\\%\x00"):
        raise OperationFailed(f"{action} failed: a VM name is 1-80 characters without / \\ or %")


def check_choice(value: str, known: Sequence[str], *, what: str, where: str, action: str) -> None:
    if value not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise NotFound(f"{action} failed: {where} has no {what} {value!r} (it has: {listed})")


def _restored(info: VmInfo, written: Mapping[int, tuple[str, str]], location: Callable[[DiskInfo], str]) -> RestoredVm:
    disks = sorted(info.disks, key=lambda d: d.key)
    return RestoredVm(
        vm_uuid=info.instance_uuid,
        name=info.name,
        host=info.host,
        datastore=disks[0].datastore if disks else "",
        power_state=info.power_state,
        disks=tuple(
            RestoredDisk(key=d.key, index=i, size_bytes=d.capacity_bytes, location=location(d),
                         digest=written.get(d.key, ("", ""))[0], method=written.get(d.key, ("", ""))[1])
            for i, d in enumerate(disks)
        ),
    )


def _report(progress: Progress | None, text: str, fraction: float) -> None:
    if progress is not None:
        progress(text, fraction)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


# --- the simulated site -----------------------------------------------------------------------


class SimulatedFailbackTarget(FailbackTarget):
    """A simulated site in ``data_dir`` (a source site, or a simulated recovery site opened
    with its source login) as the on-premises side."""

    def __init__(self, data_dir: str | os.PathLike[str], user: str, password: str, **_ignored: Any) -> None:
        self.site = SimulatedSite(data_dir, user, password)
        self.data_dir = self.site.data_dir
        self.where = self.site.where

    def __repr__(self) -> str:
        return f"<SimulatedFailbackTarget {self.data_dir}>"

    def connect(self) -> None:
        self.site.connect()

    def close(self) -> None:
        self.site.close()

    # --- reading -------------------------------------------------------------------------

    def _location(self, vm_uuid: str) -> Callable[[DiskInfo], str]:
        return lambda d: disk_file(self.data_dir, vm_uuid, d.key)

    def vm(self, vm_uuid: str) -> RestoredVm:
        return _restored(self.site.get_vm(vm_uuid), {}, self._location(vm_uuid))

    def networks(self) -> list[str]:
        return sorted(self.site.read_state().get("networks") or DEFAULT_NETWORKS)

    def hosts(self) -> list[str]:
        return sorted(self.site.read_state()["hosts"])

    def datastores(self) -> list[str]:
        return sorted(self.site.read_state()["datastores"])

    def disk_source(self, vm_uuid: str, key: int) -> str:
        return self.site.disk_path(vm_uuid, key)

    def vm_names(self) -> list[str]:
        return sorted(vm["name"] for vm in self.site.read_state()["vms"].values())

    def destroy_vm(self, vm_uuid: str) -> None:
        if vm_uuid not in self.site.read_state()["vms"]:
            return
        self.site.power_off(vm_uuid)
        self.site.destroy_vm(vm_uuid)

    def power_on(self, vm_uuid: str) -> None:
        self.site.power_on(vm_uuid)

    def power_off(self, vm_uuid: str) -> None:
        self.site.power_off(vm_uuid)

    # --- writing disks -------------------------------------------------------------------

    def _write_disks(self, *, vm_uuid: str, vm_name: str, plan: Sequence[tuple[DiskInfo, RecoveryDisk]],
                     progress: Progress | None, action: str, event: str,
                     record: Mapping[str, Any] | None = None) -> dict[int, tuple[str, str]]:
        """Export every image into a new file beside its disk file, read each back and
        verify it, fsync it; then, under the site's lock and only if the VM is still off,
        rename them all over the disk files and mark their journals. ``(digest, method)``
        per key. On any error before the renames every disk file is as it was."""
        targets = [disk_file(self.data_dir, vm_uuid, d.key) for d, _image in plan]
        temps = [temp_path(t) for t in targets]
        total = sum(image.size_bytes for _d, image in plan) or 1

        def build(n: int) -> tuple[str, str]:
            target, image = plan[n]
            try:
                # Made durable after the read-back: the device writes while the file is hashed.
                result = image.storage.export_disk_at(image.disk_name, snapshot=image.snapshot, path=temps[n],
                                                      durable=False)
            except StorageError as exc:
                raise OperationFailed(f"{action} failed: building disk {target.key} from the replica failed: "
                                      f"{exc}") from None
            if result.size_bytes != image.size_bytes:
                raise OperationFailed(f"{action} failed: the replica snapshot of disk {target.key} holds "
                                      f"{result.size_bytes} bytes, the recovery point says {image.size_bytes}")
            actual = digest_flat_file(temps[n], image.size_bytes)  # read back from the file written
            check_digest(vm=vm_name, disk=image, actual=actual, location=targets[n])
            if target.capacity_bytes > image.size_bytes:
                os.truncate(temps[n], target.capacity_bytes)  # a hole: zeros past the image
            _fsync(temps[n])
            return actual, result.method

        try:
            written: dict[int, tuple[str, str]] = {}
            done = 0
            with ThreadPoolExecutor(max_workers=min(DISK_WORKERS, len(plan)), thread_name_prefix="failback") as pool:
                for (target, image), result in zip(plan, pool.map(build, range(len(plan)))):
                    written[target.key] = result
                    done += image.size_bytes
                    _report(progress, f"Disk {target.key}: written and verified ({result[1]})", done / total)
            with self.site._update() as state:
                vm = state["vms"].get(vm_uuid)
                if vm is None:
                    raise NotFound(f"{action} failed: the VM was deleted meanwhile")
                if vm["power_state"] != POWERED_OFF:
                    raise OperationFailed(f"{action} failed: the VM was powered on meanwhile ({vm['power_state']}); "
                                          "its disks are unchanged")
                for temp, target in zip(temps, targets):
                    os.replace(temp, target)
                fsync_dir(os.path.dirname(targets[0]))
                reason = (f"the disk's contents were replaced outside the VM ({event} at {_now()}): the write "
                          "journal does not cover the change, the disk needs a resynchronization")
                for target, _image in plan:
                    _mark_replaced(journal_path(self.data_dir, vm_uuid, target.key), reason)
                vm.update(record or {})
                SimulatedSite._event(vm, "VmReconfiguredEvent", f"Reconfigured {vm['name']}: {event}")
        finally:
            for temp in temps:
                unlink_quietly(temp)  # renamed already, unless something failed
        return written

    def restore_vm(self, vm_uuid: str, disks: Mapping[int, RecoveryDisk],
                   progress: Progress | None = None) -> RestoredVm:
        info = self.site.get_vm(vm_uuid)
        action = f"Restoring the disks of VM {info.name!r} on {self.where}"
        plan = check_restore(info, disks, action=action)
        keys = ", ".join(str(d.key) for d, _image in plan)
        written = self._write_disks(vm_uuid=vm_uuid, vm_name=info.name, plan=plan, progress=progress, action=action,
                                    event=f"disk(s) {keys} restored by a Lifeboat failback")
        _report(progress, f"VM {info.name}: {len(plan)} disk(s) restored and verified; the VM is off", 1.0)
        return _restored(self.site.get_vm(vm_uuid), written, self._location(vm_uuid))

    def create_vm(self, *, name: str, host: str, datastore: str, network: str, disks: Sequence[RecoveryDisk],
                  progress: Progress | None = None) -> RestoredVm:
        action = f"Creating VM {name!r} on host {host} of {self.where}"
        check_name(name, action=action)
        state = self.site.read_state()
        check_choice(host, list(state["hosts"]), what="host", where=self.where, action=action)
        check_choice(datastore, state["datastores"], what="datastore", where=self.where, action=action)
        check_choice(network, self.networks(), what="network", where=self.where, action=action)
        check_disks(disks, action=action)
        if any(vm["name"] == name for vm in state["vms"].values()):
            raise OperationFailed(f"{action} failed: the name {name!r} already exists")
        images = sorted(disks, key=lambda d: d.index)
        try:
            info = self.site.create_vm(name=name, host=host, datastore=datastore,
                                       disk_capacities_bytes=[d.size_bytes for d in images])
        except ValueError as exc:
            raise OperationFailed(f"{action} failed: {exc}") from None
        try:
            plan = list(zip(sorted(info.disks, key=lambda d: d.key), images))
            written = self._write_disks(vm_uuid=info.instance_uuid, vm_name=name, plan=plan, progress=progress,
                                        action=action, event="disks built from a recovery point by a Lifeboat failback",
                                        record={"network": network})
        except BaseException:
            try:
                self.site.destroy_vm(info.instance_uuid)
            except ConnectorError:
                pass  # deleted meanwhile
            raise
        _report(progress, f"VM {name} is ready (powered off) with {len(plan)} verified disk(s)", 1.0)
        return _restored(self.site.get_vm(info.instance_uuid), written, self._location(info.instance_uuid))


def _mark_replaced(journal_dir: str, reason: str) -> None:
    """Leave the journal's OVERFLOW marker with the reason: the filter journals no more
    and an agent that replicates the disk resynchronizes it (``mobility.filter``). The
    journal's records stay, so its sequence numbers never repeat."""
    os.makedirs(journal_dir, exist_ok=True)
    replace_durably(os.path.join(journal_dir, OVERFLOW), reason.encode())


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- vSphere ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FlatFile:
    datacenter: str
    datastore: str
    path: str  # the raw image's file on the datastore
    location: str  # the disk as the VM names it, "[ds] dir/name.vmdk"


class VSphereFailbackTarget(FailbackTarget):
    """An on-premises vCenter (or ESXi) as the failback target."""

    def __init__(
        self,
        *,
        host: str,
        port: int = 443,
        user: str = "",
        password: str = "",
        allow_untrusted: bool = False,
        thumbprint: str | None = None,
        ca_file: str | None = None,
        timeout: float = 30.0,
        username: str = "",
        **_ignored: Any,
    ) -> None:
        self.vc = VSphereConnector(host=host, port=port, user=user or username, password=password,
                                   allow_untrusted=allow_untrusted, thumbprint=thumbprint or None, ca_file=ca_file,
                                   timeout=timeout)
        self.files = DatastoreHttp(self.vc)
        self.where = self.vc.where

    def __repr__(self) -> str:
        return f"<VSphereFailbackTarget {self.vc.host}:{self.vc.port}>"

    def connect(self) -> None:
        self.vc.connect()

    def close(self) -> None:
        self.vc.close()

    # --- reading -------------------------------------------------------------------------

    @staticmethod
    def _location(disk: DiskInfo) -> str:
        return disk.backing_file

    def vm(self, vm_uuid: str) -> RestoredVm:
        return _restored(self.vc.get_vm(vm_uuid), {}, self._location)

    def _names(self, kind: Any, wsdl: str) -> list[str]:
        with self.vc._doing(f"Listing the {wsdl}s of {self.where}"):
            nodes = self.vc._tree_nodes([kind])
        return sorted({n.name for n in nodes.values() if n.kind == wsdl})

    def hosts(self) -> list[str]:
        return self._names(vim.HostSystem, "HostSystem")

    def datastores(self) -> list[str]:
        return self._names(vim.Datastore, "Datastore")

    def networks(self) -> list[str]:
        site = VSphereRecoverySite(connector=self.vc)
        with self.vc._doing(f"Listing the networks of {self.where}"):
            nodes = self.vc._tree_nodes([vim.Network])
            names: set[str] = set()
            for dc in (n for n in nodes.values() if n.kind == "Datacenter"):
                names.update(site._network_objects(nodes, dc.name))
        return sorted(names)

    def vm_names(self) -> list[str]:
        with self.vc._doing(f"Listing the VMs of {self.where}"):
            nodes = self.vc._tree_nodes([vim.VirtualMachine])
        return sorted(n.name for n in nodes.values() if n.kind == "VirtualMachine")

    def destroy_vm(self, vm_uuid: str) -> None:
        VSphereRecoverySite(connector=self.vc).destroy_vm(vm_uuid)

    def power_on(self, vm_uuid: str) -> None:
        self.vc.power_on(vm_uuid)

    def power_off(self, vm_uuid: str) -> None:
        self.vc.power_off(vm_uuid)

    def _flat_file(self, info: VmInfo, disk: DiskInfo, action: str) -> _FlatFile:
        """The file holding the disk's raw image, from its descriptor; refuses a disk that is
        not one flat extent of the disk's capacity (snapshot deltas, sparse, split or vSAN
        disks), before anything is written."""
        match = re.match(r"\s*\[([^\]]+)\]\s*(.+\.vmdk)$", disk.backing_file)
        if match is None:
            raise OperationFailed(f"{action} refused: disk {disk.key} is not a file on a datastore "
                                  f"({disk.backing_file or 'no backing file'})")
        datastore, path = match.group(1), match.group(2)
        dc = info.datacenter
        descriptor = self.files.read_small(dc, datastore, path, limit=DESCRIPTOR_MAX,
                                           action=f"Reading the descriptor of disk {disk.key} of VM {info.name!r}")
        if descriptor is None:
            raise OperationFailed(f"{action} refused: disk {disk.key} ({disk.backing_file}) holds its data in the "
                                  ".vmdk itself (a sparse disk); only flat disks can be written in place")
        extents = parse_extents(descriptor)
        folder = posixpath.dirname(path)
        if extents:
            if len(extents) != 1 or extents[0].kind not in ("VMFS", "FLAT"):
                kinds = ", ".join(e.kind for e in extents)
                raise OperationFailed(
                    f"{action} refused: disk {disk.key} ({disk.backing_file}) is not one flat extent ({kinds}): a "
                    "disk with snapshots, a sparse or split disk cannot be written in place")
            if extents[0].sectors * SECTOR != disk.capacity_bytes:
                raise OperationFailed(
                    f"{action} refused: the descriptor of disk {disk.key} names {extents[0].sectors * SECTOR} bytes, "
                    f"the VM {disk.capacity_bytes}")
            flat = posixpath.join(folder, extents[0].file)
        else:
            # A descriptor without an extent line (vcsim writes empty ones): the flat file
            # vSphere names after the descriptor.
            flat = path[: -len(".vmdk")] + "-flat.vmdk"
            if not self.files.exists(dc, datastore, flat):
                raise OperationFailed(f"{action} refused: disk {disk.key} ({disk.backing_file}) names no flat file")
        return _FlatFile(dc, datastore, flat, disk.backing_file)

    def disk_source(self, vm_uuid: str, key: int) -> Iterator[bytes]:
        info = self.vc.get_vm(vm_uuid)
        disk = next((d for d in info.disks if d.key == key), None)
        if disk is None:
            raise NotFound(f"VM {vm_uuid} on {self.where} has no disk {key}")
        action = f"Reading disk {key} of VM {info.name!r}"
        flat = self._flat_file(info, disk, action)
        return _exactly(self.files.get(flat.datacenter, flat.datastore, flat.path, action=action), disk.capacity_bytes)

    # --- writing -------------------------------------------------------------------------

    def _upload(self, info: VmInfo, disk: DiskInfo, image: RecoveryDisk, flat: _FlatFile, action: str) -> str:
        """Upload the image (zeros up to the disk's capacity) over the flat file, download it
        again and verify it; the digest read back."""

        def body() -> Iterator[bytes]:
            yield from image.storage.iter_disk(image.disk_name, snapshot=image.snapshot, chunk_bytes=PIECE)
            left = disk.capacity_bytes - image.size_bytes
            while left > 0:
                yield _ZEROS[: min(PIECE, left)]
                left -= min(PIECE, left)

        self.files.put(flat.datacenter, flat.datastore, flat.path, body(), disk.capacity_bytes,
                       action=f"{action}: uploading disk {disk.key}")
        hasher = ImageHasher()
        got = 0
        tail_clean = True
        for piece in self.files.get(flat.datacenter, flat.datastore, flat.path,
                                    action=f"Reading back disk {disk.key} of VM {info.name!r}"):
            view = memoryview(piece)
            take = max(0, min(len(view), image.size_bytes - got))
            hasher.update(view[:take])
            if take < len(view) and any(view[take:]):
                tail_clean = False
            got += len(view)
        if got != disk.capacity_bytes:
            raise OperationFailed(f"{action} failed: disk {disk.key} reads back as {got} bytes from {self.where}, "
                                  f"not {disk.capacity_bytes}")
        check_digest(vm=info.name, disk=image, actual=hasher.digest(), location=flat.location)
        if not tail_clean:
            raise OperationFailed(f"{action} failed: disk {disk.key} reads back with data past the restored image, "
                                  "where it must hold zeros")
        return hasher.digest()

    def restore_vm(self, vm_uuid: str, disks: Mapping[int, RecoveryDisk],
                   progress: Progress | None = None) -> RestoredVm:
        info = self.vc.get_vm(vm_uuid)
        action = f"Restoring the disks of VM {info.name!r} on {self.where}"
        plan = check_restore(info, disks, action=action)
        snapshots = self.vc.list_snapshots(vm_uuid)
        if snapshots:
            raise OperationFailed(f"{action} refused: the VM has {len(snapshots)} snapshot(s); delete them first "
                                  "(a restore writes the base disks, which its snapshots depend on)")
        flats = [self._flat_file(info, target, action) for target, _image in plan]
        total = sum(image.size_bytes for _t, image in plan) or 1
        done = 0
        written: dict[int, tuple[str, str]] = {}
        for (target, image), flat in zip(plan, flats):
            _report(progress, f"Disk {target.key}: uploading", done / total)
            written[target.key] = (self._upload(info, target, image, flat, action), "upload")
            done += image.size_bytes
            _report(progress, f"Disk {target.key}: written and verified (upload)", done / total)
        _report(progress, f"VM {info.name}: {len(plan)} disk(s) restored and verified; the VM is off", 1.0)
        return _restored(self.vc.get_vm(vm_uuid), written, self._location)

    def create_vm(self, *, name: str, host: str, datastore: str, network: str, disks: Sequence[RecoveryDisk],
                  progress: Progress | None = None) -> RestoredVm:
        action = f"Creating VM {name!r} on host {host} of {self.where}"
        check_name(name, action=action)
        check_disks(disks, action=action)
        with self.vc._doing(action):
            nodes = self.vc._tree_nodes([vim.HostSystem, vim.Datastore, vim.Network, vim.VirtualMachine])
            all_hosts = [n for n in nodes.values() if n.kind == "HostSystem"]
            check_choice(host, [n.name for n in all_hosts], what="host", where=self.where, action=action)
            matches = [n for n in all_hosts if n.name == host]
            if len(matches) > 1:
                raise OperationFailed(f"{action} failed: several datacenters have a host {host!r}")
            dc = _ancestor(nodes, matches[0].parent, "Datacenter")
            mounted = list(self.vc._prop(matches[0].obj, vim.HostSystem, "datastore") or [])
            stores = [p.get("name", "") for _obj, p in self.vc._properties(mounted, [_spec(vim.Datastore, "name")])
                      ] if mounted else []
            check_choice(datastore, stores, what="datastore", where=f"host {host}", action=action)
            site = VSphereRecoverySite(connector=self.vc, datacenter=dc, datastore=datastore, placement=host)
            check_choice(network, list(site._network_objects(nodes, dc)), what="network",
                         where=f"datacenter {dc}", action=action)
            if any(n.kind == "VirtualMachine" and n.name == name for n in nodes.values()):
                raise OperationFailed(f"{action} failed: the name {name!r} already exists")
        made = site.create_vm(name=name, network=network, disks=disks, progress=progress, power_on=False)
        built = {d.location: (d.digest, d.method) for d in made.disks}
        info = self.vc.get_vm(made.vm_id)
        return _restored(info, {d.key: built[d.backing_file] for d in info.disks if d.backing_file in built},
                         self._location)


def _exactly(pieces: Generator[bytes, None, None], size: int) -> Iterator[bytes]:
    """``size`` bytes: the pieces, cut at ``size``, then zeros (a thin flat file may be
    shorter than its disk)."""
    left = size
    try:
        for piece in pieces:
            if left <= 0:
                break
            if len(piece) > left:
                piece = piece[:left]
            left -= len(piece)
            yield piece
    finally:
        pieces.close()  # ends the download
    while left > 0:
        take = min(PIECE, left)
        left -= take
        yield _ZEROS[:take]
