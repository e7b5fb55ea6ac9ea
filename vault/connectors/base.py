"""The one interface Lifeboat uses to talk to a VMware site, and what it returns.

A site is a vCenter (or ESXi) server reached through pyVmomi, or the simulated site that
Lifeboat ships as its embedded default. Both implement :class:`SiteConnector`, return the
dataclasses below and raise only :class:`ConnectorError` subclasses, whose ``str()`` is a
sentence an admin can act on (never a traceback, never a password).

VMs are named by their vCenter *instance UUID* (``config.instanceUuid``), which stays the
same when a VM is renamed or moved.
"""
from __future__ import annotations

import hashlib
import socket
import ssl
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any

POWERED_ON = "poweredOn"
POWERED_OFF = "poweredOff"
SUSPENDED = "suspended"
POWER_STATES = (POWERED_ON, POWERED_OFF, SUSPENDED)


# --- errors -------------------------------------------------------------------------------


class ConnectorError(Exception):
    """A site operation failed; ``str()`` says what happened in one sentence."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class AuthenticationFailed(ConnectorError):
    """The site rejected the user name or password."""


class Unreachable(ConnectorError):
    """The site could not be reached (refused, timed out, name not resolved, TLS failed)."""


class UntrustedCertificate(ConnectorError):
    """The site's TLS certificate is not trusted; carries its thumbprints for the admin."""

    def __init__(self, message: str, *, thumbprint_sha1: str, thumbprint_sha256: str) -> None:
        super().__init__(message)
        self.thumbprint_sha1 = thumbprint_sha1
        self.thumbprint_sha256 = thumbprint_sha256


class NotFound(ConnectorError):
    """The VM, snapshot, host or datastore does not exist on the site."""


class OperationFailed(ConnectorError):
    """The site refused or failed an operation (a task fault, a bad state)."""


# --- what a site reports -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskInfo:
    key: int
    label: str
    capacity_bytes: int
    backing_file: str
    datastore: str


@dataclass(frozen=True, slots=True)
class VmInfo:
    instance_uuid: str
    name: str
    power_state: str  # one of POWER_STATES
    guest_os: str
    host: str  # "" when the site does not say (orphaned or disconnected VM)
    datacenter: str
    cluster: str  # "" for a VM on a standalone host
    disks: tuple[DiskInfo, ...]


@dataclass(frozen=True, slots=True)
class Inventory:
    datacenters: tuple[str, ...]
    clusters: tuple[str, ...]
    hosts: tuple[str, ...]
    datastores: tuple[str, ...]
    vms: tuple[VmInfo, ...]  # templates are left out: they cannot be protected


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: str
    name: str
    quiesced: bool
    created: datetime


@dataclass(frozen=True, slots=True)
class EventInfo:
    time: datetime
    type: str
    message: str


@dataclass(frozen=True, slots=True)
class SiteInfo:
    name: str
    version: str
    api_type: str  # "VirtualCenter", "HostAgent" or "Simulated"
    instance_uuid: str


# --- the interface -----------------------------------------------------------------------


class Session(ABC):
    """A connection to a site, source or recovery side. Use as a context manager:
    ``with connector: ...`` connects and closes."""

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @abstractmethod
    def connect(self) -> None:
        """Open the session; raises AuthenticationFailed, Unreachable or UntrustedCertificate."""

    @abstractmethod
    def close(self) -> None:
        """End the session; safe to call twice."""


class SiteConnector(Session):
    """A connection to one VMware site (the source side)."""

    @abstractmethod
    def about(self) -> SiteInfo:
        """What the site says it is."""

    @abstractmethod
    def discover(self) -> Inventory:
        """Datacenters, clusters, hosts, datastores and every VM with its disks."""

    def get_vm(self, vm_uuid: str) -> VmInfo:
        """One VM by instance UUID; raises NotFound."""
        for vm in self.discover().vms:
            if vm.instance_uuid == vm_uuid:
                return vm
        raise NotFound(f"No VM with instance UUID {vm_uuid} was found")

    @abstractmethod
    def create_quiesced_snapshot(self, vm_uuid: str, name: str) -> SnapshotInfo:
        """An app-consistent (quiesced, no memory) snapshot of the VM."""

    @abstractmethod
    def list_snapshots(self, vm_uuid: str) -> list[SnapshotInfo]:
        """The VM's snapshots, parents before children."""

    @abstractmethod
    def remove_snapshot(self, vm_uuid: str, snapshot_id: str) -> None:
        """Delete one snapshot (its data is consolidated into the disks)."""

    @abstractmethod
    def power_on(self, vm_uuid: str) -> None:
        """Power the VM on; nothing happens if it is already on."""

    @abstractmethod
    def power_off(self, vm_uuid: str) -> None:
        """Hard power-off; nothing happens if it is already off."""

    @abstractmethod
    def shutdown_guest(self, vm_uuid: str) -> None:
        """Ask the guest OS to shut down (needs VMware Tools); nothing happens if already off."""

    @abstractmethod
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
        """A new, powered-off VM with empty thin disks of the given sizes."""

    @abstractmethod
    def destroy_vm(self, vm_uuid: str) -> None:
        """Power the VM off if needed and delete it with its disks."""

    @abstractmethod
    def recent_events(self, vm_uuid: str, limit: int = 20) -> list[EventInfo]:
        """The VM's most recent events, newest first."""


# --- helpers -----------------------------------------------------------------------------


def colon_hex(digest: bytes) -> str:
    """``AA:BB:...``, the way vSphere shows certificate thumbprints."""
    return ":".join(f"{b:02X}" for b in digest)


def thumbprints(der_cert: bytes) -> tuple[str, str]:
    """(SHA-1, SHA-256) thumbprints of a DER certificate."""
    return colon_hex(hashlib.sha1(der_cert).digest()), colon_hex(hashlib.sha256(der_cert).digest())


def normalize_thumbprint(value: str) -> str:
    """Lower-case hex without separators; accepts ``AA:BB:..`` and ``aabb..`` (SHA-1 or SHA-256)."""
    hexed = value.strip().replace(":", "").replace(" ", "").lower()
    if len(hexed) not in (40, 64) or any(c not in "0123456789abcdef" for c in hexed):
        raise ValueError("A thumbprint is 20 (SHA-1) or 32 (SHA-256) bytes in hex, like AA:BB:CC:...")
    return hexed


def peer_certificate(host: str, port: int, *, timeout: float = 5) -> bytes:
    """The DER certificate a TLS server presents, without judging it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise Unreachable(f"Cannot reach {host}:{port}: {describe_os_error(exc)}") from None
    if not der:
        raise Unreachable(f"{host}:{port} presented no TLS certificate")
    return der


def probe_certificate(host: str, port: int, timeout: float = 5) -> tuple[str, str]:
    """(SHA-1, SHA-256) thumbprints, ``AA:BB:...``, of the certificate the server presents."""
    return thumbprints(peer_certificate(host, port, timeout=timeout))


def describe_os_error(exc: BaseException) -> str:
    """A short phrase for a socket-level failure."""
    if isinstance(exc, socket.gaierror):
        return "the host name could not be resolved"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "the connection was reset"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc.__class__.__name__})"
    text = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
    return text[0].lower() + text[1:] if text else exc.__class__.__name__
