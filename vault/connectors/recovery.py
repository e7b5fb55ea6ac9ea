"""Recovery sites: where failed-over VMs run, behind one interface like the source side.

A recovery-site connector builds a VM from a recovery point: each disk is built at the site
from the replica snapshot (``replication.dataplane.recovery.RecoveryDisk``), read back *from
the site* and compared with the digest the replica has at the point; only when every disk
matched is the VM powered on. A mismatch raises ``VerificationFailed`` after the connector
removed everything it had built, so a failed recovery leaves nothing behind.

Two kinds, opened with :func:`vault.connectors.sites.open_recovery_site`:

* ``"simulated"`` (``recovery_sim.SimulatedRecoverySite``): a simulated vCenter in a
  directory, like the simulated source site; recovered disks are flat sparse files that the
  site's workload runner writes to once the VM is on;
* ``"vsphere"`` (``recovery_vsphere.VSphereRecoverySite``): disks are uploaded to a
  datastore over vSphere's datastore HTTP file interface, the VM is made with
  ``CreateVM_Task`` on the mapped port group and powered on.

Errors are :class:`vault.connectors.base.ConnectorError` subclasses whose text an admin can
act on; ``VerificationFailed`` comes from the data plane and names the VM, the disk and
both digests.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from replication.dataplane.recovery import RecoveryDisk, VerificationFailed
from vault.connectors.base import NotFound, OperationFailed, Session

__all__ = [
    "METHODS",
    "Progress",
    "RecoveredDisk",
    "RecoveredVmInfo",
    "RecoverySiteConnector",
    "VerificationFailed",
]

# How a recovered disk was built: shared with the replica's blocks, copied sparse in the
# kernel, uploaded over HTTP, or copied by the storage service itself.
METHODS = ("clone", "sparse-copy", "upload", "server-copy")

Progress = Callable[[str, float], None]  # (what is happening, fraction done 0..1)


@dataclass(frozen=True, slots=True)
class RecoveredDisk:
    index: int
    size_bytes: int
    location: str  # a path, a datastore path "[ds] dir/file.img", or a blob name
    digest: str  # read back from the site after building it
    method: str  # "clone" | "sparse-copy" | "upload" | "server-copy"


@dataclass(frozen=True, slots=True)
class RecoveredVmInfo:
    vm_id: str
    name: str
    network: str
    power_state: str  # "poweredOn" | "poweredOff"
    disks: tuple[RecoveredDisk, ...]

    @property
    def verified_bytes(self) -> int:
        return sum(d.size_bytes for d in self.disks)


class RecoverySiteConnector(Session):
    """A connection to one recovery site (errors: the ConnectorError subclasses of the
    source side)."""

    @abstractmethod
    def networks(self) -> list[str]:
        """The networks (port groups) a recovered VM can be attached to."""

    @abstractmethod
    def create_vm(
        self,
        *,
        name: str,
        network: str,
        disks: Sequence[RecoveryDisk],
        guest_os: str = "otherGuest64",
        progress: Progress | None = None,
    ) -> RecoveredVmInfo:
        """Build every disk at the site, read each back and compare it with
        ``disk.expected`` (``VerificationFailed`` on a mismatch, after removing what was
        built), then power the VM on."""

    @abstractmethod
    def replace_disks(
        self, vm_id: str, disks: Sequence[RecoveryDisk], progress: Progress | None = None
    ) -> RecoveredVmInfo:
        """Change recovery point: power off, build and verify the new disks, swap them in,
        power on. On a mismatch the VM keeps its old disks (and stays off)."""

    @abstractmethod
    def get_vm(self, vm_id: str) -> RecoveredVmInfo:
        """A recovered VM by id; ``NotFound`` if it is not there."""

    @abstractmethod
    def power_off(self, vm_id: str) -> None:
        """Hard power-off; nothing happens if it is already off."""

    @abstractmethod
    def power_on(self, vm_id: str) -> None:
        """Power on; nothing happens if it is already on."""

    @abstractmethod
    def destroy_vm(self, vm_id: str) -> None:
        """Power off and delete the VM with its disks; a VM already gone is fine."""

    @abstractmethod
    def read_disk(self, vm_id: str, index: int) -> Iterator[bytes]:
        """The recovered disk's bytes as the site returns them now (for tests and checks)."""


def check_request(*, name: str, network: str, disks: Sequence[RecoveryDisk], known_networks: Sequence[str],
                  where: str) -> None:
    """The checks every connector makes before building anything."""
    action = f"Recovering VM {name!r} on {where}"
    if not isinstance(name, str) or not name.strip() or len(name) > 80 or any(c in name for c in "/\\%\x00"):
        raise OperationFailed(f"{action} failed: a VM name is 1-80 characters without / \\ or %")
    if network not in known_networks:
        known = ", ".join(known_networks) or "none"
        raise NotFound(f"{action} failed: the site has no network {network!r} (it has: {known})")
    check_disks(disks, action=action)


def check_disks(disks: Sequence[RecoveryDisk], *, action: str) -> None:
    if not disks:
        raise OperationFailed(f"{action} failed: a VM needs at least one disk")
    indexes = [d.index for d in disks]
    if len(set(indexes)) != len(indexes):
        raise OperationFailed(f"{action} failed: disk indexes {sorted(indexes)} repeat")
    for d in disks:
        if not isinstance(d, RecoveryDisk):
            raise TypeError(f"{action}: disks must be RecoveryDisk, not {type(d).__name__}")
