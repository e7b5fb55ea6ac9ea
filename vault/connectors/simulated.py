"""The simulated VMware site: Lifeboat's embedded default and demo.

It behaves like a small vCenter behind the :class:`SiteConnector` interface (same operations,
same errors), with real disks: each VM disk is a sparse file
``<data_dir>/disks/<vm_uuid>/<disk_key>.img``. The inventory lives in ``<data_dir>/site.json``,
changed only under an exclusive lock on ``site.json.lock`` and replaced atomically, because
the web process, workers and the workload runner (``python -m vault.connectors.simsite``) use
it at the same time.

The runner writes to powered-on VMs through the mobility write filter, so every write lands in
``<data_dir>/journal/<vm_uuid>/<disk_key>/`` too. A quiesced snapshot freezes the VM's writes
for a moment (``<data_dir>/io/<vm_uuid>.lock``) and records each disk's last journal sequence
number: the position in the stream that an app-consistent recovery point stands for.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, Sequence

from mobility.agent import guest_freeze
from mobility.durable import replace_durably
from mobility.filter import HoldTimeout, WriteHold, hold_writes, last_seq, lock_exclusive_by
from vault.connectors.base import (
    POWER_STATES,
    POWERED_OFF,
    POWERED_ON,
    SUSPENDED,
    AuthenticationFailed,
    ConnectorError,
    DiskInfo,
    EventInfo,
    Inventory,
    NotFound,
    OperationFailed,
    SiteConnector,
    SiteInfo,
    SnapshotInfo,
    Unreachable,
    VmInfo,
)

FORMAT = 1
SECTOR = 512
PATTERNS = ("uniform", "hotspot", "sequential")
MAX_WRITE_SIZE = 4 * 1024 * 1024
EVENTS_KEPT = 100  # per VM
FIRST_DISK_KEY = 2000  # vSphere numbers the disks on the first SCSI controller from 2000
DEFAULT_DISK_BYTES = 64 * 1024 * 1024
QUIESCE_TIMEOUT = 30.0
_PBKDF2_ROUNDS = 60_000
_UUID_NAMESPACE = uuid.UUID("5b0f3c4e-2d7a-4f51-9a53-6c1f0b8e7d21")


def vm_uuid_for(name: str) -> str:
    """The instance UUID a seeded VM gets: the same name always gives the same UUID."""
    return str(uuid.uuid5(_UUID_NAMESPACE, name))


def disk_file(data_dir: str, vm_uuid: str, disk_key: int) -> str:
    """``<data_dir>/disks/<vm_uuid>/<disk_key>.img``, whether or not it exists."""
    return os.path.join(data_dir, "disks", vm_uuid, f"{int(disk_key)}.img")


def journal_path(data_dir: str, vm_uuid: str, disk_key: int) -> str:
    """``<data_dir>/journal/<vm_uuid>/<disk_key>``, whether or not it exists."""
    return os.path.join(data_dir, "journal", vm_uuid, str(int(disk_key)))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _hash_password(password: str, salt: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _PBKDF2_ROUNDS).hex()


def auth_record(user: str, password: str) -> dict[str, str]:
    """The ``auth`` entry of site.json for a login: the user and a salted PBKDF2 of the password."""
    salt = secrets.token_bytes(16)
    return {"user": user, "salt": salt.hex(), "hash": _hash_password(password, salt)}


def _check_capacity(size: int) -> None:
    if not isinstance(size, int) or size <= 0 or size % SECTOR:
        raise ValueError(f"Disk capacity {size!r} is not a positive multiple of {SECTOR} bytes")


class SimulatedSite(SiteConnector):
    """A simulated vCenter whose inventory and disks live in ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike[str], user: str, password: str) -> None:
        self.data_dir = os.fspath(data_dir)
        self.user = user
        self._password = password
        self._connected = False
        self.where = f"Simulated site {self.data_dir}"

    def __repr__(self) -> str:
        return f"<SimulatedSite {self.user}@{self.data_dir}>"

    # --- files ---------------------------------------------------------------------------

    @property
    def site_file(self) -> str:
        return os.path.join(self.data_dir, "site.json")

    def _disk_file(self, vm_uuid: str, disk_key: int) -> str:
        return disk_file(self.data_dir, vm_uuid, disk_key)

    def _journal(self, vm_uuid: str, disk_key: int) -> str:
        return journal_path(self.data_dir, vm_uuid, disk_key)

    def io_lock_file(self, vm_uuid: str) -> str:
        """Held shared by the workload runner while it writes to the VM, exclusively to quiesce it."""
        return os.path.join(self.data_dir, "io", f"{vm_uuid}.lock")

    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.site_file + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.site_file, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise Unreachable(f"There is no simulated site in {self.data_dir}") from None

    def read_state(self) -> dict[str, Any]:
        """The whole site.json as it is now (for the workload runner and tests)."""
        if not os.path.exists(self.site_file):
            raise Unreachable(f"There is no simulated site in {self.data_dir}")
        with self._lock(exclusive=False):
            return self._load()

    def _store(self, state: dict[str, Any]) -> None:
        # no indent: json.dumps then uses its C encoder (an indented dump of a site of 100 VMs
        # took ~40 ms of CPU on each change, under the exclusive lock every site operation waits on)
        replace_durably(self.site_file, json.dumps(state, sort_keys=True).encode())

    @contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        """site.json for changing: written back when the block ends without an error."""
        if not os.path.exists(self.site_file):
            raise Unreachable(f"There is no simulated site in {self.data_dir}")
        with self._lock(exclusive=True):
            state = self._load()
            yield state
            self._store(state)

    # --- creating a site -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        user: str,
        password: str,
        vms: Sequence[str | Mapping[str, Any]] = (),
        datacenter: str = "Datacenter",
        cluster: str = "Cluster",
        hosts: Sequence[str] = ("esx-01.sim.local", "esx-02.sim.local"),
        datastores: Sequence[str] = ("datastore1",),
    ) -> "SimulatedSite":
        """Seed a new site. Each VM is a name or a mapping: name, disks (byte sizes), power_state,
        guest_os, host, workload (rate_bytes_per_s, write_size, pattern). Returns it unconnected."""
        site = cls(data_dir, user, password)
        if not hosts or not datastores:
            raise ValueError("A simulated site needs at least one host and one datastore")
        os.makedirs(site.data_dir, exist_ok=True)
        with site._lock(exclusive=True):  # two processes seeding the same directory: one wins
            if os.path.exists(site.site_file):
                raise ConnectorError(f"A simulated site already exists in {site.data_dir}")
            site._store(site._seed(user=user, password=password, vms=vms, datacenter=datacenter, cluster=cluster,
                                   hosts=hosts, datastores=datastores))
        return site

    @staticmethod
    def exists(data_dir: str | os.PathLike[str]) -> bool:
        """Whether ``data_dir`` holds a simulated site."""
        return os.path.exists(os.path.join(os.fspath(data_dir), "site.json"))

    def _seed(self, *, user: str, password: str, vms: Sequence[str | Mapping[str, Any]], datacenter: str,
              cluster: str, hosts: Sequence[str], datastores: Sequence[str]) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": FORMAT,
            "name": "Lifeboat simulated VMware site",
            "instance_uuid": str(uuid.uuid4()),
            "auth": auth_record(user, password),
            "datacenter": datacenter,
            "hosts": {h: {"cluster": cluster} for h in hosts},
            "datastores": list(datastores),
            "next_snapshot": 1,
            "vms": {},
        }
        host_names = list(hosts)
        for i, spec in enumerate(vms):
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            name = spec["name"]
            vm_uuid = vm_uuid_for(name)
            if vm_uuid in state["vms"]:
                raise ValueError(f"Two seeded VMs are named {name!r}")
            host = spec.get("host", host_names[i % len(host_names)])
            if host not in state["hosts"]:
                raise ValueError(f"VM {name!r} is on host {host!r}, which the site does not have")
            power_state = spec.get("power_state", POWERED_ON)
            if power_state not in POWER_STATES:
                raise ValueError(f"Unknown power state {power_state!r}")
            vm = self._new_vm(name=name, host=host, datastore=state["datastores"][0],
                              capacities=list(spec.get("disks", [DEFAULT_DISK_BYTES])),
                              guest_os=spec.get("guest_os", "otherGuest64"), power_state=power_state)
            if spec.get("workload"):
                vm["workload"] = _workload(**spec["workload"])
            state["vms"][vm_uuid] = vm
            self._make_disks(vm_uuid, vm)
        return state

    def _new_vm(self, *, name: str, host: str, datastore: str, capacities: list[int], guest_os: str,
                power_state: str) -> dict[str, Any]:
        if not capacities:
            raise ValueError("A VM needs at least one disk")
        for size in capacities:
            _check_capacity(size)
        disks = []
        for i, size in enumerate(capacities):
            file = f"{name}.vmdk" if i == 0 else f"{name}_{i}.vmdk"
            disks.append({"key": FIRST_DISK_KEY + i, "label": f"Hard disk {i + 1}", "capacity_bytes": size,
                          "datastore": datastore, "backing_file": f"[{datastore}] {name}/{file}"})
        return {
            "name": name,
            "power_state": power_state,
            "guest_os": guest_os,
            "host": host,
            "disks": disks,
            "snapshots": [],
            "workload": _workload(rate_bytes_per_s=0, write_size=4096, pattern="uniform"),
            "events": [
                {"time": _now(), "type": "VmCreatedEvent", "message": f"Created virtual machine {name} on {host}"},
            ],
        }

    def _make_disks(self, vm_uuid: str, vm: Mapping[str, Any]) -> None:
        os.makedirs(os.path.join(self.data_dir, "disks", vm_uuid), exist_ok=True)
        for disk in vm["disks"]:
            with open(self._disk_file(vm_uuid, disk["key"]), "wb") as f:
                f.truncate(disk["capacity_bytes"])  # sparse: no blocks until written

    # --- session -------------------------------------------------------------------------

    def connect(self) -> None:
        auth = self.read_state()["auth"]
        expected = _hash_password(self._password, bytes.fromhex(auth["salt"]))
        user_ok = hmac.compare_digest(self.user.encode(), auth["user"].encode())
        if not (hmac.compare_digest(expected, auth["hash"]) and user_ok):
            raise AuthenticationFailed(f"{self.where} rejected the user name or password")
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def _check(self) -> None:
        if not self._connected:
            raise ConnectorError(f"Not connected to {self.where}")

    def _vm(self, state: Mapping[str, Any], vm_uuid: str) -> dict[str, Any]:
        vm = state["vms"].get(vm_uuid)
        if vm is None:
            raise NotFound(f"No VM with instance UUID {vm_uuid} on {self.where}")
        return vm

    @staticmethod
    def _event(vm: dict[str, Any], kind: str, message: str) -> None:
        vm["events"].append({"time": _now(), "type": kind, "message": message})
        del vm["events"][:-EVENTS_KEPT]

    # --- reading -------------------------------------------------------------------------

    def about(self) -> SiteInfo:
        self._check()
        state = self.read_state()
        return SiteInfo(name=state["name"], version=f"lifeboat-sim-{state['format']}", api_type="Simulated",
                        instance_uuid=state["instance_uuid"])

    def _vm_info(self, state: Mapping[str, Any], vm_uuid: str, vm: Mapping[str, Any]) -> VmInfo:
        return VmInfo(
            instance_uuid=vm_uuid,
            name=vm["name"],
            power_state=vm["power_state"],
            guest_os=vm["guest_os"],
            host=vm["host"],
            datacenter=state["datacenter"],
            cluster=state["hosts"].get(vm["host"], {}).get("cluster") or "",
            disks=tuple(DiskInfo(key=d["key"], label=d["label"], capacity_bytes=d["capacity_bytes"],
                                 backing_file=d["backing_file"], datastore=d["datastore"]) for d in vm["disks"]),
        )

    def discover(self) -> Inventory:
        self._check()
        state = self.read_state()
        vms = [self._vm_info(state, u, vm) for u, vm in state["vms"].items()]
        return Inventory(
            datacenters=(state["datacenter"],),
            clusters=tuple(sorted({h["cluster"] for h in state["hosts"].values() if h.get("cluster")})),
            hosts=tuple(sorted(state["hosts"])),
            datastores=tuple(sorted(state["datastores"])),
            vms=tuple(sorted(vms, key=lambda v: (v.name, v.instance_uuid))),
        )

    def get_vm(self, vm_uuid: str) -> VmInfo:
        self._check()
        state = self.read_state()
        return self._vm_info(state, vm_uuid, self._vm(state, vm_uuid))

    def recent_events(self, vm_uuid: str, limit: int = 20) -> list[EventInfo]:
        self._check()
        vm = self._vm(self.read_state(), vm_uuid)
        events = [EventInfo(time=datetime.fromisoformat(e["time"]), type=e["type"], message=e["message"])
                  for e in vm["events"]]
        return list(reversed(events))[:limit]

    # --- snapshots -----------------------------------------------------------------------

    @contextmanager
    def _quiesced(self, vm_uuid: str, *, timeout: float = QUIESCE_TIMEOUT) -> Iterator[None]:
        """Hold the VM's writes (the workload runner's) while the block runs."""
        path = self.io_lock_file(vm_uuid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not lock_exclusive_by(fd, time.monotonic() + timeout, poll=0.01):
                raise OperationFailed(f"Quiescing VM {vm_uuid} failed: its writes did not pause within {timeout:.0f}s")
            yield
        finally:
            os.close(fd)

    def create_quiesced_snapshot(self, vm_uuid: str, name: str, *, guest_bookmark: dict | None = None) -> SnapshotInfo:
        """A quiesced snapshot of a running VM (a powered-off VM's snapshot is not marked quiesced,
        as in vSphere). Records each disk's journal position.

        While the VM's writes are held, the guest's freeze hook runs, as VMware Tools runs a
        guest's freeze scripts: the VM's mobility agent (``<data_dir>/agents/<vm_uuid>``)
        bookmarks its items at that very moment (``mobility.agent.guest_freeze``), with the
        vault's ``guest_bookmark`` id and label when given."""
        self._check()
        vm_state = self._vm(self.read_state(), vm_uuid)
        with self._quiesced(vm_uuid):
            agent_dir = os.path.join(self.data_dir, "agents", vm_uuid)
            if vm_state["power_state"] == POWERED_ON and os.path.isdir(agent_dir):
                guest_freeze(agent_dir, bookmark_id=(guest_bookmark or {}).get("id"),
                             label=(guest_bookmark or {}).get("label", ""))
            with self._update() as state:
                vm = self._vm(state, vm_uuid)
                snapshot = {
                    "id": f"snapshot-{state['next_snapshot']}",
                    "name": name,
                    "quiesced": vm["power_state"] == POWERED_ON,
                    "created": _now(),
                    "journal_seq": {str(d["key"]): last_seq(self._journal(vm_uuid, d["key"]))
                                    for d in vm["disks"]},
                }
                state["next_snapshot"] += 1
                vm["snapshots"].append(snapshot)
                self._event(vm, "TaskEvent", f"Task: Create virtual machine snapshot {name} of {vm['name']}")
        return _snapshot_info(snapshot)

    def hold_group_writes(self, vm_uuids: Sequence[str], *, timeout: float) -> tuple[WriteHold, dict[str, dict[int, int]]]:
        """The barrier of a replication group's shared point: hold the completion of new
        writes on every disk of these VMs at once (through their write filters; writes in
        flight complete first) and return the hold with each VM's journal positions under it
        (per disk key, the last journaled seq). ``release()`` the hold promptly. Raises
        OperationFailed, holding nothing, when a VM's writes are not held within ``timeout``."""
        self._check()
        state = self.read_state()
        dirs = {vm_uuid: {d["key"]: self._journal(vm_uuid, d["key"]) for d in self._vm(state, vm_uuid)["disks"]}
                for vm_uuid in vm_uuids}
        try:
            hold = hold_writes([p for by_key in dirs.values() for p in by_key.values()], timeout=timeout)
        except HoldTimeout as exc:
            raise OperationFailed(f"Holding the writes of {len(dirs)} VM(s) failed: {exc}") from None
        return hold, {vm_uuid: {key: last_seq(path) for key, path in by_key.items()} for vm_uuid, by_key in dirs.items()}

    def place_group_bookmarks(self, vm_uuids: Sequence[str], bookmark: dict) -> None:
        """While :meth:`hold_group_writes` holds their writes: run each VM's guest hook (its
        mobility agent's freeze hook, as a quiesce does) so that its agent bookmarks its items
        at these very journal positions, carrying the group point ``bookmark["group"]``."""
        self._check()
        state = self.read_state()
        for vm_uuid in vm_uuids:
            agent_dir = os.path.join(self.data_dir, "agents", vm_uuid)
            if self._vm(state, vm_uuid)["power_state"] == POWERED_ON and os.path.isdir(agent_dir):
                guest_freeze(agent_dir, bookmark_id=bookmark["id"], label=bookmark.get("label", ""),
                             group=bookmark["group"])

    def list_snapshots(self, vm_uuid: str) -> list[SnapshotInfo]:
        self._check()
        return [_snapshot_info(s) for s in self._vm(self.read_state(), vm_uuid)["snapshots"]]

    def snapshot_journal_seq(self, vm_uuid: str, snapshot_id: str) -> dict[int, int]:
        """Per disk key, the last journal sequence number written before the snapshot."""
        for snap in self._vm(self.read_state(), vm_uuid)["snapshots"]:
            if snap["id"] == snapshot_id:
                return {int(k): v for k, v in snap["journal_seq"].items()}
        raise NotFound(f"VM {vm_uuid} on {self.where} has no snapshot {snapshot_id}")

    def remove_snapshot(self, vm_uuid: str, snapshot_id: str) -> None:
        self._check()
        with self._update() as state:
            vm = self._vm(state, vm_uuid)
            kept = [s for s in vm["snapshots"] if s["id"] != snapshot_id]
            if len(kept) == len(vm["snapshots"]):
                raise NotFound(f"VM {vm_uuid} on {self.where} has no snapshot {snapshot_id}")
            vm["snapshots"] = kept
            self._event(vm, "TaskEvent", f"Task: Remove snapshot {snapshot_id} of {vm['name']}")

    # --- power ---------------------------------------------------------------------------

    def _set_power(self, vm_uuid: str, target: str, events: Sequence[tuple[str, str]], *, refuse: str | None = None,
                   action: str = "") -> None:
        self._check()
        with self._update() as state:
            vm = self._vm(state, vm_uuid)
            if vm["power_state"] == target:
                return
            if refuse is not None and vm["power_state"] == refuse:
                raise OperationFailed(f"{action} VM {vm_uuid} failed: the VM is {refuse}")
            vm["power_state"] = target
            where = f"{vm['name']} on {vm['host']} in {state['datacenter']}"
            for kind, text in events:
                self._event(vm, kind, f"{where} {text}")

    def power_on(self, vm_uuid: str) -> None:
        self._set_power(vm_uuid, POWERED_ON,
                        [("VmStartingEvent", "is starting"), ("VmPoweredOnEvent", "is powered on")])

    def power_off(self, vm_uuid: str) -> None:
        self._set_power(vm_uuid, POWERED_OFF,
                        [("VmStoppingEvent", "is stopping"), ("VmPoweredOffEvent", "is powered off")])

    def shutdown_guest(self, vm_uuid: str) -> None:
        self._set_power(vm_uuid, POWERED_OFF,
                        [("VmGuestShutdownEvent", "guest OS shut down"), ("VmPoweredOffEvent", "is powered off")],
                        refuse=SUSPENDED, action="Shutting down the guest OS of")

    # --- creating, changing and deleting VMs ---------------------------------------------

    def create_vm(
        self,
        *,
        name: str,
        host: str,
        datastore: str,
        disk_capacities_bytes: list[int],
        guest_os: str = "otherGuest64",
        datacenter: str | None = None,
    ) -> VmInfo:
        self._check()
        action = f"Creating VM {name!r} on host {host}"
        with self._update() as state:
            if datacenter is not None and datacenter != state["datacenter"]:
                raise NotFound(f"{action} failed: {self.where} has no datacenter {datacenter}")
            if host not in state["hosts"]:
                raise NotFound(f"{action} failed: {self.where} has no host {host}")
            if datastore not in state["datastores"]:
                raise NotFound(f"{action} failed: host {host} has no datastore {datastore}")
            if any(vm["name"] == name for vm in state["vms"].values()):
                raise OperationFailed(f"{action} failed: the name {name!r} already exists")
            vm = self._new_vm(name=name, host=host, datastore=datastore, capacities=list(disk_capacities_bytes),
                              guest_os=guest_os, power_state=POWERED_OFF)
            vm_uuid = str(uuid.uuid4())
            self._make_disks(vm_uuid, vm)
            state["vms"][vm_uuid] = vm
            return self._vm_info(state, vm_uuid, vm)

    def destroy_vm(self, vm_uuid: str) -> None:
        self._check()
        with self._update() as state:
            self._vm(state, vm_uuid)
            del state["vms"][vm_uuid]
        shutil.rmtree(os.path.join(self.data_dir, "disks", vm_uuid), ignore_errors=True)
        shutil.rmtree(os.path.join(self.data_dir, "journal", vm_uuid), ignore_errors=True)
        try:
            os.unlink(self.io_lock_file(vm_uuid))
        except FileNotFoundError:
            pass

    def set_workload(self, vm_uuid: str, *, rate_bytes_per_s: int, write_size: int, pattern: str) -> None:
        """How the workload runner writes to this VM's disks while it is powered on (0: not at all)."""
        self._check()
        workload = _workload(rate_bytes_per_s=rate_bytes_per_s, write_size=write_size, pattern=pattern)
        with self._update() as state:
            self._vm(state, vm_uuid)["workload"] = workload

    def resize_disk(self, vm_uuid: str, disk_key: int, new_capacity: int) -> None:
        """Grow a disk (vSphere disks only grow)."""
        self._check()
        _check_capacity(new_capacity)
        with self._update() as state:
            vm = self._vm(state, vm_uuid)
            disk = next((d for d in vm["disks"] if d["key"] == int(disk_key)), None)
            if disk is None:
                raise NotFound(f"VM {vm_uuid} on {self.where} has no disk {disk_key}")
            if new_capacity < disk["capacity_bytes"]:
                raise OperationFailed(f"Resizing disk {disk_key} of VM {vm_uuid} failed: "
                                      f"a disk cannot shrink (from {disk['capacity_bytes']} to {new_capacity} bytes)")
            with open(self._disk_file(vm_uuid, disk["key"]), "r+b") as f:
                f.truncate(new_capacity)
            disk["capacity_bytes"] = new_capacity
            self._event(vm, "VmReconfiguredEvent",
                        f"Reconfigured {vm['name']}: {disk['label']} is now {new_capacity} bytes")

    def add_disk(self, vm_uuid: str, capacity: int, *, datastore: str | None = None) -> DiskInfo:
        """Add a new (empty, sparse) disk to a VM, as vSphere's "Add hard disk" does: it gets
        the next free key on the VM's controller and is written to by the workload at once."""
        self._check()
        _check_capacity(capacity)
        with self._update() as state:
            vm = self._vm(state, vm_uuid)
            datastore = datastore or (vm["disks"][0]["datastore"] if vm["disks"] else state["datastores"][0])
            if datastore not in state["datastores"]:
                raise NotFound(f"Adding a disk to VM {vm_uuid} failed: {self.where} has no datastore {datastore}")
            # a key no disk of the VM had (a removed disk's file stays on the datastore)
            key = max([d["key"] for d in vm["disks"]] + [FIRST_DISK_KEY - 1]) + 1
            while os.path.exists(self._disk_file(vm_uuid, key)):
                key += 1
            number = len(vm["disks"]) + 1
            disk = {"key": key, "label": f"Hard disk {number}", "capacity_bytes": capacity, "datastore": datastore,
                    "backing_file": f"[{datastore}] {vm['name']}/{vm['name']}_{key - FIRST_DISK_KEY}.vmdk"}
            os.makedirs(os.path.join(self.data_dir, "disks", vm_uuid), exist_ok=True)
            with open(self._disk_file(vm_uuid, key), "wb") as f:
                f.truncate(capacity)
            vm["disks"].append(disk)
            self._event(vm, "VmReconfiguredEvent", f"Reconfigured {vm['name']}: added {disk['label']} of {capacity} bytes")
        return DiskInfo(key=key, label=disk["label"], capacity_bytes=capacity, backing_file=disk["backing_file"],
                        datastore=datastore)

    def remove_disk(self, vm_uuid: str, disk_key: int) -> None:
        """Remove a disk from a VM (vSphere's "Remove from virtual machine": the disk's file
        stays on the datastore, the VM no longer writes to it)."""
        self._check()
        with self._update() as state:
            vm = self._vm(state, vm_uuid)
            disk = next((d for d in vm["disks"] if d["key"] == int(disk_key)), None)
            if disk is None:
                raise NotFound(f"VM {vm_uuid} on {self.where} has no disk {disk_key}")
            if len(vm["disks"]) == 1:
                raise OperationFailed(f"Removing disk {disk_key} of VM {vm_uuid} failed: it is the VM's only disk")
            vm["disks"] = [d for d in vm["disks"] if d is not disk]
            self._event(vm, "VmReconfiguredEvent", f"Reconfigured {vm['name']}: removed {disk['label']}")

    # --- paths for the agent and the workload runner -------------------------------------

    def _disk_record(self, vm_uuid: str, disk_key: int) -> None:
        vm = self._vm(self.read_state(), vm_uuid)
        if not any(d["key"] == int(disk_key) for d in vm["disks"]):
            raise NotFound(f"VM {vm_uuid} on {self.where} has no disk {disk_key}")

    def disk_path(self, vm_uuid: str, disk_key: int) -> str:
        """The file holding the disk's bytes."""
        self._disk_record(vm_uuid, disk_key)
        return self._disk_file(vm_uuid, disk_key)

    def journal_dir(self, vm_uuid: str, disk_key: int) -> str:
        """Where the write filter journals the disk's writes."""
        self._disk_record(vm_uuid, disk_key)
        return self._journal(vm_uuid, disk_key)


def _workload(*, rate_bytes_per_s: int, write_size: int, pattern: str) -> dict[str, Any]:
    if not isinstance(rate_bytes_per_s, int) or rate_bytes_per_s < 0:
        raise ValueError("rate_bytes_per_s must be a whole number of bytes, 0 or more")
    if not isinstance(write_size, int) or write_size <= 0 or write_size % SECTOR or write_size > MAX_WRITE_SIZE:
        raise ValueError(f"write_size must be a multiple of {SECTOR} bytes, at most {MAX_WRITE_SIZE}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}")
    return {"rate_bytes_per_s": rate_bytes_per_s, "write_size": write_size, "pattern": pattern}


def _snapshot_info(snap: Mapping[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(id=snap["id"], name=snap["name"], quiesced=snap["quiesced"],
                        created=datetime.fromisoformat(snap["created"]))
