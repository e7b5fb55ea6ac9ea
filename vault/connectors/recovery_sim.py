"""The simulated recovery site: Lifeboat's embedded default place to fail over to.

It is a simulated VMware site (``vault.connectors.simulated``) in its own directory, with
networks. A recovered VM is a VM of that site like any other: an entry in ``site.json`` and
one flat sparse file per disk (``<data_dir>/disks/<vm_uuid>/<disk_key>.img``), so the
site's workload runner (``python -m vault.connectors.simsite --data-dir <data_dir>``) writes
to it once it is powered on, through the mobility write filter (journaled), and the site can
later be the source of a failback.

Building a disk: the replica snapshot is exported straight into the VM's disk file
(``Storage.export_disk_at``: only what the snapshot holds, reflinked where the file system
can, else copied in the kernel; never-written ranges stay holes), read back from that file
and hashed (holes cost no reads) and compared with the point's digest, then fsync'd (the
device writes the file back while it is being hashed). The
disks of a VM are built in parallel. The VM is registered and powered on only when every disk
matched; on a mismatch or any error its files are removed and nothing is registered.

Changing the recovery point builds the new disks beside the old ones under new disk keys
(new files and journals, so a workload runner holding the old files open can never write
into the new ones), verifies them, and only then swaps them into the VM's entry and removes
the old ones.
"""
from __future__ import annotations

import os
import secrets
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, Sequence

from replication.dataplane.recovery import RecoveryDisk, check_digest
from replication.dataplane.storage import StorageError
from replication.dataplane.storage.base import ExportResult, digest_flat_file
from vault.connectors.base import (
    POWERED_OFF,
    POWERED_ON,
    ConnectorError,
    NotFound,
    OperationFailed,
)
from vault.connectors.recovery import (
    Progress,
    RecoveredDisk,
    RecoveredVmInfo,
    RecoverySiteConnector,
    check_disks,
    check_request,
)
from vault.connectors.simulated import (
    FIRST_DISK_KEY,
    SimulatedSite,
    _workload,
    auth_record,
    disk_file,
    journal_path,
)

DEFAULT_NETWORKS = ("recovery-net", "test-net")
RECOVERY_HOST = "esx-r01.recovery.sim.local"
RECOVERY_DATASTORE = "recovery-ds"
# What a recovered VM writes once on, unless the site is opened with another ``workload``
# (written by the site's workload runner, when one runs for the site).
DEFAULT_WORKLOAD = {"rate_bytes_per_s": 64 * 1024, "write_size": 4096, "pattern": "hotspot"}
DISK_WORKERS = 2  # disks of one VM built at once (each export and hash uses the kernel and all cores)
READ_PIECE = 4 * 1024 * 1024


class _LocalSite(SimulatedSite):
    """The site's files, used by a process beside them (no login, as the workload runner)."""

    def connect(self) -> None:
        self.read_state()
        self._connected = True


class SimulatedRecoverySite(RecoverySiteConnector):
    """A simulated recovery site in ``data_dir`` (made on first connect)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        networks: Sequence[str] | None = None,
        workload: Mapping[str, Any] | None = None,
        username: str = "",
        password: str = "",
        **_ignored: Any,
    ) -> None:
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        if networks is not None:
            networks = [str(n) for n in networks]
            if not networks or any(not n.strip() for n in networks):
                raise ConnectorError("A simulated recovery site needs at least one network, each with a name")
        self._networks = networks
        try:
            self._workload = _workload(**(workload if workload is not None else DEFAULT_WORKLOAD))
        except (TypeError, ValueError) as exc:
            raise ConnectorError(f"The workload for recovered VMs is not valid: {exc}") from None
        self._username = username or "administrator@recovery.sim.local"
        self._password = password or secrets.token_urlsafe(16)
        self.where = f"Simulated recovery site {self.data_dir}"
        self.site = _LocalSite(self.data_dir, "", "")

    def __repr__(self) -> str:
        return f"<SimulatedRecoverySite {self.data_dir}>"

    # --- session -------------------------------------------------------------------------

    def connect(self) -> None:
        if not SimulatedSite.exists(self.data_dir):
            try:
                os.makedirs(self.data_dir, exist_ok=True)
                SimulatedSite.create(self.data_dir, user=self._username, password=self._password, vms=(),
                                     datacenter="RecoveryDatacenter", cluster="RecoveryCluster",
                                     hosts=(RECOVERY_HOST,), datastores=(RECOVERY_DATASTORE,))
            except ConnectorError:
                pass  # made meanwhile by another process: use it
            except OSError as exc:
                raise ConnectorError(f"Cannot create a simulated recovery site in {self.data_dir}: "
                                     f"{exc.strerror or exc}") from None
        self.site.connect()
        current = self.site.read_state().get("networks")
        wanted = sorted(set(self._networks)) if self._networks is not None else current or list(DEFAULT_NETWORKS)
        if wanted != current:
            with self.site._update() as state:
                state["networks"] = wanted

    def close(self) -> None:
        self.site.close()

    def networks(self) -> list[str]:
        return list(self.site.read_state().get("networks", []))

    def source_login(self, user: str, password: str) -> None:
        """Set the login with which this site is opened as a simulated *source* site
        (``SimulatedSite(data_dir, user, password)``), so that a recovered VM can be
        protected back from here: its agent is pushed and it is discovered as on any source
        site. Stored like the source site's own (a salted PBKDF2 in site.json); replaces the
        login the site had."""
        if not isinstance(user, str) or not user.strip() or not isinstance(password, str) or not password:
            raise ConnectorError(f"Setting the login of {self.where} failed: a user name and a password are needed")
        record = auth_record(user, password)
        with self.site._update() as state:
            state["auth"] = record

    # --- reading -------------------------------------------------------------------------

    def _record(self, state: Mapping[str, Any], vm_id: str) -> dict[str, Any]:
        vm = state["vms"].get(vm_id)
        if vm is None or "recovery" not in vm:
            raise NotFound(f"No recovered VM {vm_id} on {self.where}")
        return vm

    def _info(self, vm_id: str, vm: Mapping[str, Any]) -> RecoveredVmInfo:
        return RecoveredVmInfo(
            vm_id=vm_id,
            name=vm["name"],
            network=vm["recovery"]["network"],
            power_state=vm["power_state"],
            disks=tuple(
                RecoveredDisk(index=d["index"], size_bytes=d["size_bytes"], location=d["location"],
                              digest=d["digest"], method=d["method"])
                for d in vm["recovery"]["disks"]
            ),
        )

    def get_vm(self, vm_id: str) -> RecoveredVmInfo:
        return self._info(vm_id, self._record(self.site.read_state(), vm_id))

    def list_vms(self) -> list[RecoveredVmInfo]:
        state = self.site.read_state()
        return sorted((self._info(u, vm) for u, vm in state["vms"].items() if "recovery" in vm),
                      key=lambda v: (v.name, v.vm_id))

    def read_disk(self, vm_id: str, index: int) -> Iterator[bytes]:
        disk = next((d for d in self.get_vm(vm_id).disks if d.index == index), None)
        if disk is None:
            raise NotFound(f"Recovered VM {vm_id} on {self.where} has no disk {index}")
        with open(disk.location, "rb") as f:
            left = disk.size_bytes
            while left > 0:
                piece = f.read(min(READ_PIECE, left))
                if not piece:  # a file shorter than the disk reads as zeros past its end
                    piece = bytes(min(READ_PIECE, left))
                left -= len(piece)
                yield piece

    def disk_path(self, vm_id: str, index: int) -> str:
        """The file holding a recovered disk (the VM's workload writes there)."""
        for d in self.get_vm(vm_id).disks:
            if d.index == index:
                return d.location
        raise NotFound(f"Recovered VM {vm_id} on {self.where} has no disk {index}")

    # --- building disks ------------------------------------------------------------------

    @staticmethod
    def _report(progress: Progress | None, text: str, fraction: float) -> None:
        if progress is not None:
            progress(text, fraction)

    def _build_disks(self, *, vm_name: str, vm_id: str, keys: Sequence[int], disks: Sequence[RecoveryDisk],
                     progress: Progress | None) -> list[dict[str, Any]]:
        """Export every disk into ``disks/<vm_id>/<key>.img``, then read each back and verify
        it, then make them durable; the disk records. The disks are handled in parallel,
        ``progress`` is called from this thread only. Raises (VerificationFailed,
        ConnectorError) after removing the files it made."""
        vm_dir = os.path.join(self.data_dir, "disks", vm_id)
        os.makedirs(vm_dir, exist_ok=True)
        paths = [disk_file(self.data_dir, vm_id, key) for key in keys]
        total = sum(d.size_bytes for d in disks) or 1

        def export(n: int) -> ExportResult:
            disk = disks[n]
            try:
                # Made durable after the read-back: the device writes while the file is hashed.
                result = disk.storage.export_disk_at(disk.disk_name, snapshot=disk.snapshot, path=paths[n],
                                                     durable=False)
            except StorageError as exc:
                raise OperationFailed(
                    f"Building disk {disk.index} of recovered VM {vm_name!r} failed: {exc}") from None
            if result.size_bytes != disk.size_bytes:
                raise OperationFailed(
                    f"Building disk {disk.index} of recovered VM {vm_name!r} failed: the snapshot holds "
                    f"{result.size_bytes} bytes, the recovery point says {disk.size_bytes}")
            return result

        def verify(n: int) -> str:
            actual = digest_flat_file(paths[n], disks[n].size_bytes)  # read back from the site's file
            check_digest(vm=vm_name, disk=disks[n], actual=actual, location=paths[n])
            _fsync(paths[n])
            return actual

        try:
            with ThreadPoolExecutor(max_workers=min(DISK_WORKERS, len(disks)), thread_name_prefix="recover") as pool:
                results = list(pool.map(export, range(len(disks))))
                for disk, result in zip(disks, results):
                    self._report(progress, f"Disk {disk.index}: built ({result.method}), verifying", 0.0)
                digests = []
                done = 0
                for disk, actual in zip(disks, pool.map(verify, range(len(disks)))):
                    digests.append(actual)
                    done += disk.size_bytes
                    self._report(progress, f"Disk {disk.index}: verified", done / total)
            _fsync(vm_dir)
        except BaseException:
            for path in paths:
                _remove(path)
            raise
        return [{"index": d.index, "key": key, "size_bytes": d.size_bytes, "location": path, "digest": digest,
                 "method": result.method}
                for d, key, path, digest, result in zip(disks, keys, paths, digests, results)]

    # --- VMs -----------------------------------------------------------------------------

    def create_vm(
        self,
        *,
        name: str,
        network: str,
        disks: Sequence[RecoveryDisk],
        guest_os: str = "otherGuest64",
        progress: Progress | None = None,
    ) -> RecoveredVmInfo:
        check_request(name=name, network=network, disks=disks, known_networks=self.networks(), where=self.where)
        disks = sorted(disks, key=lambda d: d.index)
        action = f"Recovering VM {name!r} on {self.where}"
        state = self.site.read_state()
        if any(vm["name"] == name for vm in state["vms"].values()):
            raise OperationFailed(f"{action} failed: the name {name!r} already exists")
        vm_id = str(uuid.uuid4())
        keys = [FIRST_DISK_KEY + d.index for d in disks]
        vm_dir = os.path.join(self.data_dir, "disks", vm_id)
        try:
            records = self._build_disks(vm_name=name, vm_id=vm_id, keys=keys, disks=disks, progress=progress)
            with self.site._update() as state:
                if any(vm["name"] == name for vm in state["vms"].values()):
                    raise OperationFailed(f"{action} failed: the name {name!r} already exists")
                host = next(iter(sorted(state["hosts"])))
                datastore = state["datastores"][0]
                state["vms"][vm_id] = {
                    "name": name,
                    "power_state": POWERED_OFF,
                    "guest_os": guest_os,
                    "host": host,
                    "disks": [_disk_entry(r, name, datastore) for r in records],
                    "snapshots": [],
                    "workload": dict(self._workload),
                    "events": [{"time": _now(), "type": "VmCreatedEvent",
                                "message": f"Created virtual machine {name} on {host} from a recovery point"}],
                    "recovery": {"network": network, "disks": records, "created": _now()},
                }
        except BaseException:
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise
        self.site.power_on(vm_id)
        self._report(progress, f"VM {name} is running with {len(records)} verified disk(s)", 1.0)
        return self.get_vm(vm_id)

    def replace_disks(
        self, vm_id: str, disks: Sequence[RecoveryDisk], progress: Progress | None = None
    ) -> RecoveredVmInfo:
        state = self.site.read_state()
        vm = self._record(state, vm_id)
        name = vm["name"]
        check_disks(disks, action=f"Changing the recovery point of VM {name!r} on {self.where}")
        disks = sorted(disks, key=lambda d: d.index)
        was_on = vm["power_state"] == POWERED_ON
        self.site.power_off(vm_id)
        # New keys: new files and journals, never the ones a workload runner may still hold.
        next_key = max((d["key"] for d in vm["disks"]), default=FIRST_DISK_KEY - 1) + 1
        keys = [next_key + i for i in range(len(disks))]
        try:
            records = self._build_disks(vm_name=name, vm_id=vm_id, keys=keys, disks=disks, progress=progress)
        except BaseException:
            if was_on:
                self.site.power_on(vm_id)  # the old disks are untouched
            raise
        with self.site._update() as state:
            vm = self._record(state, vm_id)
            old = [d["key"] for d in vm["disks"]]
            datastore = state["datastores"][0]
            vm["disks"] = [_disk_entry(r, name, datastore) for r in records]
            vm["recovery"]["disks"] = records
            vm["snapshots"] = []
            SimulatedSite._event(vm, "VmReconfiguredEvent", f"Reconfigured {name}: disks replaced from a recovery point")
        for key in old:
            _remove(disk_file(self.data_dir, vm_id, key))
            shutil.rmtree(journal_path(self.data_dir, vm_id, key), ignore_errors=True)
        self.site.power_on(vm_id)
        self._report(progress, f"VM {name} is running with {len(records)} verified disk(s)", 1.0)
        return self.get_vm(vm_id)

    def power_off(self, vm_id: str) -> None:
        self._record(self.site.read_state(), vm_id)
        self.site.power_off(vm_id)

    def power_on(self, vm_id: str) -> None:
        self._record(self.site.read_state(), vm_id)
        self.site.power_on(vm_id)

    def destroy_vm(self, vm_id: str) -> None:
        vm = self.site.read_state()["vms"].get(vm_id)
        if vm is None:
            return
        if "recovery" not in vm:
            raise OperationFailed(f"Deleting VM {vm['name']!r} on {self.where} refused: it was not made by a "
                                  "Lifeboat recovery")
        try:
            self.site.power_off(vm_id)
            self.site.destroy_vm(vm_id)
        except NotFound:
            pass  # removed meanwhile
        shutil.rmtree(os.path.join(self.data_dir, "disks", vm_id), ignore_errors=True)

    def set_workload(self, vm_id: str, *, rate_bytes_per_s: int, write_size: int, pattern: str) -> None:
        """How the site's workload runner writes to a recovered VM while it is on."""
        self._record(self.site.read_state(), vm_id)
        self.site.set_workload(vm_id, rate_bytes_per_s=rate_bytes_per_s, write_size=write_size, pattern=pattern)


def _disk_entry(record: Mapping[str, Any], vm_name: str, datastore: str) -> dict[str, Any]:
    index = record["index"]
    file = f"{vm_name}.vmdk" if index == 0 else f"{vm_name}_{index}.vmdk"
    return {"key": record["key"], "label": f"Hard disk {index + 1}", "capacity_bytes": record["size_bytes"],
            "datastore": datastore, "backing_file": f"[{datastore}] {vm_name}/{file}"}


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
