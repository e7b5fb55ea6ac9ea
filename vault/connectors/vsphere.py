"""The vCenter/ESXi connector, on pyVmomi.

TLS is verified against the system's trust store (or ``ca_file``). A server whose certificate
is not trusted raises :class:`UntrustedCertificate` with its thumbprints, so the admin can check
and pin it (``thumbprint=``: exactly that certificate is accepted, on every connection), or
accept any certificate with ``allow_untrusted=True``.

Discovery reads the whole inventory through one ContainerView and the PropertyCollector
(``RetrievePropertiesEx`` paged with ``ContinueRetrievePropertiesEx``): a handful of SOAP calls
for a thousand VMs. ``round_trips`` counts the SOAP calls made since ``connect()``.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import logging
import math
import re
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Iterator

from pyVmomi import SoapStubAdapter, vim, vmodl
from pyVmomi.VmomiSupport import GetServiceVersions, versionIdMap

from vault.connectors.base import (
    POWERED_OFF,
    POWERED_ON,
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
    UntrustedCertificate,
    VmInfo,
    describe_os_error,
    normalize_thumbprint,
    peer_certificate,
    thumbprints,
)

log = logging.getLogger(__name__)

DISCOVERY_PAGE = 500  # objects per RetrievePropertiesEx page
SDK_PATH = "/sdk"
DISKS_PER_CONTROLLER = 15  # SCSI unit 7 is the controller's own

_VM_PROPS = [
    "name",
    "parent",
    "parentVApp",
    "config.instanceUuid",
    "config.template",
    "config.guestId",
    "config.hardware.device",
    "guest.guestId",
    "runtime.powerState",
    "runtime.host",
]
_TREE_PROPS = ["name", "parent"]

PropertyCollector = vmodl.query.PropertyCollector


class _CertificateMismatch(Exception):
    def __init__(self, der: bytes) -> None:
        super().__init__("the server presented a different certificate")
        self.der = der


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that accepts exactly one certificate (by SHA-1 or SHA-256)."""

    def __init__(self, *args: Any, pin: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pin = pin

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        algorithm = hashlib.sha1 if len(self._pin) == 40 else hashlib.sha256
        if not hmac.compare_digest(algorithm(der).hexdigest(), self._pin):
            self.close()
            raise _CertificateMismatch(der)


@dataclass
class _Node:
    """An inventory object seen while resolving names: what it is, its name and its parent."""

    obj: Any
    kind: str
    name: str
    parent: str | None  # moId


class VSphereConnector(SiteConnector):
    """A session with one vCenter or ESXi server."""

    def __init__(
        self,
        *,
        host: str,
        user: str,
        password: str,
        port: int = 443,
        allow_untrusted: bool = False,
        thumbprint: str | None = None,
        ca_file: str | None = None,
        timeout: float = 30.0,
        task_timeout: float = 900.0,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.user = user
        self._password = password
        self.allow_untrusted = allow_untrusted
        self._pin = normalize_thumbprint(thumbprint) if thumbprint else None
        self.ca_file = ca_file
        self.timeout = timeout
        self.task_timeout = task_timeout
        self.where = f"vCenter {host}:{self.port}"
        self._stub: Any = None
        self._content: Any = None
        self._round_trips = 0
        self._session_no = 0  # how many times we logged in; tells threads whether to log in again
        self._count_lock = threading.Lock()
        self._relogin_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<VSphereConnector {self.user}@{self.host}:{self.port}>"

    @property
    def round_trips(self) -> int:
        """SOAP calls made since connect()."""
        return self._round_trips

    # --- session -------------------------------------------------------------------------

    def connect(self) -> None:
        self.close()
        self._round_trips = 0
        context = self._ssl_context()
        factory = self._connection_factory()
        version = self._negotiate_version(context, factory)
        stub = SoapStubAdapter(
            host=self.host,
            port=self.port,
            path=SDK_PATH,
            version=version,
            sslContext=context,
            httpConnectionTimeout=self.timeout,
        )
        if self._pin:
            stub.scheme = factory  # every new connection checks the pinned certificate
        self._install_counter(stub)
        self._stub = stub
        try:
            with self._doing("Connecting"):
                self._content = vim.ServiceInstance("ServiceInstance", stub).RetrieveContent()
            self._login()
        except BaseException:
            self._stub = None
            self._content = None
            stub.DropConnections()
            raise
        about = self._content.about
        log.info("Connected to %s as %s (%s, API %s)", self.where, self.user, about.fullName, about.apiVersion)

    def close(self) -> None:
        stub, content = self._stub, self._content
        self._stub = None
        self._content = None
        if stub is None:
            return
        try:
            if content is not None:
                content.sessionManager.Logout()
        except Exception:  # the session may already be gone; nothing to clean up then
            pass
        finally:
            stub.DropConnections()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._pin or self.allow_untrusted:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=self.ca_file)

    def _connection_factory(self) -> Any:
        if self._pin:
            return functools.partial(_PinnedHTTPSConnection, pin=self._pin)
        return http.client.HTTPSConnection

    def _negotiate_version(self, context: ssl.SSLContext, factory: Any) -> str:
        """The newest vim25 API version both pyVmomi and the server speak."""
        conn = factory(self.host, self.port, context=context, timeout=self.timeout)
        try:
            with self._doing("Connecting"):
                conn.request("GET", f"{SDK_PATH}/vimServiceVersions.xml")
                response = conn.getresponse()
                body = response.read()
        finally:
            conn.close()
        offered: set[str] = set()
        if response.status == 200:
            try:
                root = ElementTree.fromstring(body)
            except ElementTree.ParseError:
                root = None
            if root is not None:
                for namespace in root.findall("namespace"):
                    if namespace.findtext("name") == "urn:vim25":
                        offered.add(namespace.findtext("version") or "")
                        offered.update(v.text or "" for v in namespace.findall("priorVersions/version"))
        for version in GetServiceVersions("vim25"):
            if versionIdMap.get(version) in offered:
                return version
        raise ConnectorError(f"{self.where} does not offer a vSphere API version Lifeboat can use")

    def _login(self) -> None:
        try:
            self._content.sessionManager.Login(self.user, self._password, None)
            with self._count_lock:
                self._session_no += 1
        except vim.fault.InvalidLogin:
            raise AuthenticationFailed(f"{self.where} rejected the user name or password") from None
        except ConnectorError:
            raise
        except Exception as exc:
            err = self._translate(exc, "Logging in")
            if err is None:
                raise
            raise err from None

    def _install_counter(self, stub: Any) -> None:
        """Count every SOAP call, and log in again once when the server has ended the session."""
        invoke = stub.InvokeMethod

        def counted(mo: Any, info: Any, args: Any, outerStub: Any = None) -> Any:
            with self._count_lock:
                self._round_trips += 1
                session = self._session_no
            try:
                return invoke(mo, info, args, outerStub)
            except vim.fault.NotAuthenticated:
                if info.wsdlName in ("Login", "Logout") or self._content is None:
                    raise
            with self._relogin_lock:
                if session == self._session_no:  # no other thread has logged in again meanwhile
                    log.info("%s ended the session; logging in again", self.where)
                    self._login()
            with self._count_lock:
                self._round_trips += 1
            return invoke(mo, info, args, outerStub)

        stub.InvokeMethod = counted

    # --- error translation ---------------------------------------------------------------

    @contextmanager
    def _doing(self, action: str) -> Iterator[None]:
        try:
            yield
        except ConnectorError:
            raise
        except Exception as exc:
            err = self._translate(exc, action)
            if err is None:
                raise
            raise err from exc

    def _translate(self, exc: BaseException, action: str) -> ConnectorError | None:
        if isinstance(exc, _CertificateMismatch):
            sha1, sha256 = thumbprints(exc.der)
            return UntrustedCertificate(
                f"{self.where} presented a certificate (SHA-1 thumbprint {sha1}) that is not the trusted one",
                thumbprint_sha1=sha1,
                thumbprint_sha256=sha256,
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            try:
                sha1, sha256 = thumbprints(peer_certificate(self.host, self.port, timeout=self.timeout))
            except Unreachable:
                sha1 = sha256 = ""
            reason = exc.verify_message or "not trusted"
            return UntrustedCertificate(
                f"The certificate of {self.where} is not trusted ({reason}); its SHA-1 thumbprint is {sha1}",
                thumbprint_sha1=sha1,
                thumbprint_sha256=sha256,
            )
        if isinstance(exc, vim.fault.InvalidLogin):
            return AuthenticationFailed(f"{self.where} rejected the user name or password")
        if isinstance(exc, vim.fault.NotAuthenticated):
            return AuthenticationFailed(f"{action} failed: {self.where} did not accept the session")
        if isinstance(exc, vmodl.fault.ManagedObjectNotFound):
            return NotFound(f"{action} failed: the object no longer exists on {self.where}")
        if isinstance(exc, vmodl.MethodFault):
            return OperationFailed(f"{action} failed: {fault_text(exc)}")
        if isinstance(exc, (OSError, http.client.HTTPException)):
            detail = describe_os_error(exc) if isinstance(exc, OSError) else str(exc) or "bad HTTP response"
            if action == "Connecting":
                return Unreachable(f"Cannot reach {self.where}: {detail}")
            return Unreachable(f"{action} failed: lost the connection to {self.where} ({detail})")
        if isinstance(exc, _TaskFault):
            return None  # _task_errors words it
        # A response pyVmomi could not make sense of, or a bug here: keep the traceback in the
        # log, give the caller a sentence.
        log.error("%s on %s failed unexpectedly", action, self.where, exc_info=exc)
        return ConnectorError(f"{action} failed: unexpected response from {self.where} ({type(exc).__name__})")

    # --- reading -------------------------------------------------------------------------

    @property
    def content(self) -> Any:
        if self._content is None:
            raise ConnectorError(f"Not connected to {self.where}")
        return self._content

    def about(self) -> SiteInfo:
        about = self.content.about
        return SiteInfo(
            name=about.fullName or about.name,
            version=about.version,
            api_type=about.apiType,
            instance_uuid=about.instanceUuid or "",
        )

    def _retrieve(self, spec: Any) -> list[Any]:
        """Every ObjectContent for a FilterSpec, following the pages."""
        collector = self.content.propertyCollector
        options = PropertyCollector.RetrieveOptions(maxObjects=DISCOVERY_PAGE)
        result = collector.RetrievePropertiesEx(specSet=[spec], options=options)
        objects: list[Any] = []
        while result is not None:
            objects.extend(result.objects)
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(token=result.token)
        return objects

    def _destroy_view(self, view: Any) -> None:
        """Best effort: a failure here must not hide the error that got us here."""
        try:
            view.DestroyView()
        except Exception as exc:  # the server drops views with the session anyway
            log.debug("Could not destroy a container view on %s: %s", self.where, type(exc).__name__)

    def _prop(self, obj: Any, kind: Any, path: str) -> Any:
        """One property of one object (None when the server leaves it out)."""
        fetched = self._properties([obj], [_spec(kind, path)])
        return fetched[0][1].get(path) if fetched else None

    def _properties(self, objs: list[Any], prop_specs: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        spec = PropertyCollector.FilterSpec(
            objectSet=[PropertyCollector.ObjectSpec(obj=o, skip=False) for o in objs],
            propSet=prop_specs,
        )
        return [(oc.obj, {p.name: p.val for p in oc.propSet}) for oc in self._retrieve(spec)]

    def discover(self) -> Inventory:
        with self._doing(f"Discovering the inventory of {self.where}"):
            content = self.content
            view = content.viewManager.CreateContainerView(
                container=content.rootFolder,
                type=[vim.VirtualMachine, vim.HostSystem, vim.ComputeResource, vim.ResourcePool,
                      vim.Datacenter, vim.Datastore, vim.Folder],
                recursive=True,
            )
            try:
                spec = PropertyCollector.FilterSpec(
                    objectSet=[PropertyCollector.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[PropertyCollector.TraversalSpec(
                            name="view", type=vim.view.ContainerView, path="view", skip=False)],
                    )],
                    propSet=[
                        PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=_VM_PROPS),
                        PropertyCollector.PropertySpec(type=vim.Datastore, pathSet=["name"]),
                        *[PropertyCollector.PropertySpec(type=t, pathSet=_TREE_PROPS)
                          for t in (vim.HostSystem, vim.ComputeResource, vim.ResourcePool, vim.Datacenter, vim.Folder)],
                    ],
                )
                objects = self._retrieve(spec)
            finally:
                self._destroy_view(view)

        nodes: dict[str, _Node] = {}
        vms: list[dict[str, Any]] = []
        for oc in objects:
            props = {p.name: p.val for p in oc.propSet}
            kind = _kind(oc.obj)
            if kind == "VirtualMachine":
                vms.append(props)
            else:
                nodes[oc.obj._moId] = _Node(oc.obj, kind, props.get("name", ""), _moid(props.get("parent")))
        infos = []
        for props in vms:
            info = self._vm_info(props, nodes)
            if info is not None:
                infos.append(info)
        by_kind: dict[str, list[str]] = {}
        for node in nodes.values():
            by_kind.setdefault(node.kind, []).append(node.name)
        return Inventory(
            datacenters=tuple(sorted(by_kind.get("Datacenter", []))),
            clusters=tuple(sorted(by_kind.get("ClusterComputeResource", []))),
            hosts=tuple(sorted(by_kind.get("HostSystem", []))),
            datastores=tuple(sorted(by_kind.get("Datastore", []))),
            vms=tuple(sorted(infos, key=lambda v: (v.name, v.instance_uuid))),
        )

    def _vm_info(self, props: dict[str, Any], nodes: dict[str, _Node]) -> VmInfo | None:
        """A VmInfo from a VM's properties; None for templates and VMs that cannot be identified."""
        name = props.get("name", "")
        uuid = props.get("config.instanceUuid")
        if props.get("config.template"):
            return None
        if not uuid:
            log.warning("VM %r on %s reports no instance UUID (inaccessible?); left out", name, self.where)
            return None
        host = nodes.get(_moid(props.get("runtime.host")) or "")
        cluster = ""
        if host is not None:
            parent = nodes.get(host.parent or "")
            if parent is not None and parent.kind == "ClusterComputeResource":
                cluster = parent.name
        start = _moid(props.get("parent")) or _moid(props.get("parentVApp")) or (host.parent if host else None)
        datacenter = _ancestor(nodes, start, "Datacenter")
        disks = []
        for dev in props.get("config.hardware.device") or []:
            if not isinstance(dev, vim.vm.device.VirtualDisk):
                continue
            backing = dev.backing
            file_name = getattr(backing, "fileName", None) or ""
            ds_node = nodes.get(_moid(getattr(backing, "datastore", None)) or "")
            datastore = ds_node.name if ds_node else _datastore_of_path(file_name)
            capacity = dev.capacityInBytes or (dev.capacityInKB or 0) * 1024
            label = dev.deviceInfo.label if dev.deviceInfo is not None else ""
            disks.append(DiskInfo(key=dev.key, label=label or "", capacity_bytes=int(capacity),
                                  backing_file=file_name, datastore=datastore))
        return VmInfo(
            instance_uuid=uuid,
            name=name,
            power_state=str(props.get("runtime.powerState") or POWERED_OFF),
            guest_os=props.get("config.guestId") or props.get("guest.guestId") or "",
            host=host.name if host else "",
            datacenter=datacenter,
            cluster=cluster,
            disks=tuple(sorted(disks, key=lambda d: d.key)),
        )

    def _resolve_ancestors(self, nodes: dict[str, _Node], start: list[str | None], objs: dict[str, Any]) -> None:
        """Fetch name and parent of the given objects and all their ancestors, level by level."""
        pending = {m for m in start if m and m not in nodes}
        while pending:
            fetched = self._properties(
                [objs[m] for m in pending],
                [PropertyCollector.PropertySpec(type=vim.ManagedEntity, pathSet=_TREE_PROPS)],
            )
            pending = set()
            for obj, props in fetched:
                parent = props.get("parent")
                nodes[obj._moId] = _Node(obj, _kind(obj), props.get("name", ""), _moid(parent))
                if parent is not None and parent._moId not in nodes:
                    objs[parent._moId] = parent
                    pending.add(parent._moId)

    def _vm_info_for(self, vm: Any) -> VmInfo:
        """A VmInfo for one VM object, fetching only what it needs."""
        fetched = self._properties([vm], [PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=_VM_PROPS)])
        if not fetched:
            raise NotFound(f"The VM no longer exists on {self.where}")
        props = fetched[0][1]
        objs: dict[str, Any] = {}
        starts: list[str | None] = []
        for key in ("runtime.host", "parent", "parentVApp"):
            ref = props.get(key)
            if ref is not None:
                objs[ref._moId] = ref
                starts.append(ref._moId)
        for dev in props.get("config.hardware.device") or []:
            ds = getattr(getattr(dev, "backing", None), "datastore", None)
            if isinstance(dev, vim.vm.device.VirtualDisk) and ds is not None:
                objs[ds._moId] = ds
                starts.append(ds._moId)
        nodes: dict[str, _Node] = {}
        self._resolve_ancestors(nodes, starts, objs)
        info = self._vm_info(props, nodes)
        if info is None:
            raise NotFound(f"VM {props.get('name', '')!r} on {self.where} is a template or has no instance UUID")
        return info

    def _find_vm(self, vm_uuid: str) -> Any:
        vm = self.content.searchIndex.FindByUuid(None, vm_uuid, True, True)
        if vm is None:
            raise NotFound(f"No VM with instance UUID {vm_uuid} on {self.where}")
        return vm

    def get_vm(self, vm_uuid: str) -> VmInfo:
        with self._doing(f"Reading VM {vm_uuid}"):
            return self._vm_info_for(self._find_vm(vm_uuid))

    # --- tasks ---------------------------------------------------------------------------

    def _wait(self, task: Any, action: str, *, timeout: float | None = None) -> Any:
        """The task's result; its fault becomes OperationFailed; gives up after the timeout."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.task_timeout)
        pause = 0.02
        spec = [PropertyCollector.PropertySpec(type=vim.Task, pathSet=["info.state", "info.error", "info.result"])]
        while True:
            fetched = self._properties([task], spec)
            info = fetched[0][1] if fetched else {}
            state = info.get("info.state")
            if state == vim.TaskInfo.State.success:
                return info.get("info.result")
            if state == vim.TaskInfo.State.error:
                raise _TaskFault(info.get("info.error"))
            if time.monotonic() >= deadline:
                raise OperationFailed(f"{action} did not finish in time on {self.where} (task {task._moId} is {state})")
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    @contextmanager
    def _task_errors(self, action: str) -> Iterator[None]:
        try:
            with self._doing(action):
                yield
        except _TaskFault as exc:
            fault = exc.fault
            if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
                raise NotFound(f"{action} failed: the object no longer exists on {self.where}") from None
            raise OperationFailed(f"{action} failed: {fault_text(fault)}") from None

    # --- snapshots -----------------------------------------------------------------------

    def _snapshot_tree(self, vm: Any) -> list[Any]:
        props = self._properties([vm], [PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])])
        info = props[0][1].get("snapshot") if props else None
        flat: list[Any] = []

        def walk(nodes: list[Any]) -> None:
            for node in nodes:
                flat.append(node)
                walk(node.childSnapshotList or [])

        walk(info.rootSnapshotList if info is not None else [])
        return flat

    def create_quiesced_snapshot(self, vm_uuid: str, name: str) -> SnapshotInfo:
        action = f"Creating quiesced snapshot {name!r} of VM {vm_uuid}"
        with self._task_errors(action):
            vm = self._find_vm(vm_uuid)
            task = vm.CreateSnapshot_Task(name=name, description="Lifeboat app-consistent recovery point",
                                          memory=False, quiesce=True)
            snapshot = self._wait(task, action)
            for node in self._snapshot_tree(vm):
                if node.snapshot._moId == snapshot._moId:
                    return _snapshot_info(node)
        raise OperationFailed(f"{action}: the snapshot does not appear in the VM's snapshot tree")

    def list_snapshots(self, vm_uuid: str) -> list[SnapshotInfo]:
        with self._doing(f"Listing the snapshots of VM {vm_uuid}"):
            return [_snapshot_info(n) for n in self._snapshot_tree(self._find_vm(vm_uuid))]

    def remove_snapshot(self, vm_uuid: str, snapshot_id: str) -> None:
        action = f"Removing snapshot {snapshot_id} of VM {vm_uuid}"
        with self._task_errors(action):
            for node in self._snapshot_tree(self._find_vm(vm_uuid)):
                if node.snapshot._moId == snapshot_id:
                    self._wait(node.snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True), action)
                    return
        raise NotFound(f"VM {vm_uuid} on {self.where} has no snapshot {snapshot_id}")

    # --- power ---------------------------------------------------------------------------

    def _power(self, vm_uuid: str, *, target: str) -> None:
        action = f"Powering {'on' if target == POWERED_ON else 'off'} VM {vm_uuid}"
        with self._task_errors(action):
            vm = self._find_vm(vm_uuid)
            task = vm.PowerOnVM_Task() if target == POWERED_ON else vm.PowerOffVM_Task()
            try:
                self._wait(task, action)
            except _TaskFault as exc:
                if not _already(exc.fault, target):
                    raise

    def power_on(self, vm_uuid: str) -> None:
        self._power(vm_uuid, target=POWERED_ON)

    def power_off(self, vm_uuid: str) -> None:
        self._power(vm_uuid, target=POWERED_OFF)

    def shutdown_guest(self, vm_uuid: str) -> None:
        with self._doing(f"Shutting down the guest OS of VM {vm_uuid}"):
            vm = self._find_vm(vm_uuid)
            try:
                vm.ShutdownGuest()
            except vim.fault.InvalidPowerState as fault:
                if not _already(fault, POWERED_OFF):
                    raise

    # --- creating and deleting VMs -------------------------------------------------------

    def _tree_nodes(self, types: list[Any]) -> dict[str, _Node]:
        """name/parent of every object of the given types plus datacenters and folders."""
        content = self.content
        view = content.viewManager.CreateContainerView(
            container=content.rootFolder,
            type=[*types, vim.Datacenter, vim.Folder, vim.ComputeResource],
            recursive=True,
        )
        try:
            spec = PropertyCollector.FilterSpec(
                objectSet=[PropertyCollector.ObjectSpec(
                    obj=view, skip=True,
                    selectSet=[PropertyCollector.TraversalSpec(name="view", type=vim.view.ContainerView, path="view")],
                )],
                propSet=[PropertyCollector.PropertySpec(type=vim.ManagedEntity, pathSet=_TREE_PROPS)],
            )
            objects = self._retrieve(spec)
        finally:
            self._destroy_view(view)
        nodes = {}
        for oc in objects:
            props = {p.name: p.val for p in oc.propSet}
            nodes[oc.obj._moId] = _Node(oc.obj, _kind(oc.obj), props.get("name", ""), _moid(props.get("parent")))
        return nodes

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
        _check_capacities(disk_capacities_bytes)
        action = f"Creating VM {name!r} on host {host}"
        with self._task_errors(action):
            nodes = self._tree_nodes([vim.HostSystem])
            hosts = [n for n in nodes.values() if n.kind == "HostSystem" and n.name == host
                     and (datacenter is None or _ancestor(nodes, n.parent, "Datacenter") == datacenter)]
            if not hosts:
                where = f" in datacenter {datacenter}" if datacenter else ""
                raise NotFound(f"{action} failed: {self.where} has no host {host}{where}")
            if len(hosts) > 1:
                raise ConnectorError(f"{action} failed: several datacenters have a host {host}; say which")
            host_node = hosts[0]
            dc_node = _ancestor_node(nodes, host_node.parent, "Datacenter")
            compute = nodes.get(host_node.parent or "")
            if dc_node is None or compute is None:
                raise OperationFailed(f"{action} failed: cannot tell which datacenter host {host} belongs to")
            host_datastores = self._prop(host_node.obj, vim.HostSystem, "datastore") or []
            names = self._properties(list(host_datastores), [_spec(vim.Datastore, "name")]) if host_datastores else []
            if datastore not in {props.get("name") for _obj, props in names}:
                raise NotFound(f"{action} failed: host {host} has no datastore {datastore}")
            folder = self._prop(dc_node.obj, vim.Datacenter, "vmFolder")
            pool = self._prop(compute.obj, vim.ComputeResource, "resourcePool")
            spec = _config_spec(name=name, guest_os=guest_os, datastore=datastore, capacities=disk_capacities_bytes)
            task = folder.CreateVM_Task(config=spec, pool=pool, host=host_node.obj)
            vm = self._wait(task, action)
            log.info("Created VM %r on %s (%s, %d disks)", name, self.where, host, len(disk_capacities_bytes))
            return self._vm_info_for(vm)

    def destroy_vm(self, vm_uuid: str) -> None:
        action = f"Deleting VM {vm_uuid}"
        with self._task_errors(action):
            vm = self._find_vm(vm_uuid)
            if self._prop(vm, vim.VirtualMachine, "runtime.powerState") != POWERED_OFF:
                try:
                    self._wait(vm.PowerOffVM_Task(), action)
                except _TaskFault as exc:
                    if not _already(exc.fault, POWERED_OFF):
                        raise
            self._wait(vm.Destroy_Task(), action)
            log.info("Deleted VM %s on %s", vm_uuid, self.where)

    # --- events --------------------------------------------------------------------------

    def recent_events(self, vm_uuid: str, limit: int = 20) -> list[EventInfo]:
        with self._doing(f"Reading the events of VM {vm_uuid}"):
            vm = self._find_vm(vm_uuid)
            spec = vim.event.EventFilterSpec(
                entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"),
                maxCount=max(1, limit),
            )
            events = self.content.eventManager.QueryEvents(spec) or []
        events = sorted(events, key=lambda e: (e.createdTime, e.key), reverse=True)[:limit]
        return [
            EventInfo(time=e.createdTime.astimezone(timezone.utc), type=_kind(e), message=e.fullFormattedMessage or "")
            for e in events
        ]


def _spec(kind: Any, *paths: str) -> Any:
    return PropertyCollector.PropertySpec(type=kind, pathSet=list(paths))


class _TaskFault(Exception):
    def __init__(self, fault: Any) -> None:
        super().__init__(fault_text(fault))
        self.fault = fault


def _kind(obj: Any) -> str:
    return type(obj)._wsdlName


def _moid(ref: Any) -> str | None:
    return ref._moId if ref is not None else None


def _ancestor_node(nodes: dict[str, _Node], start: str | None, kind: str) -> _Node | None:
    seen = set()
    while start and start not in seen:
        seen.add(start)
        node = nodes.get(start)
        if node is None:
            return None
        if node.kind == kind:
            return node
        start = node.parent
    return None


def _ancestor(nodes: dict[str, _Node], start: str | None, kind: str) -> str:
    node = _ancestor_node(nodes, start, kind)
    return node.name if node else ""


def _datastore_of_path(path: str) -> str:
    """'[ds1] vm/disk.vmdk' -> 'ds1'."""
    match = re.match(r"\s*\[([^\]]*)\]", path)
    return match.group(1) if match else ""


def _snapshot_info(node: Any) -> SnapshotInfo:
    return SnapshotInfo(id=node.snapshot._moId, name=node.name, quiesced=bool(node.quiesced),
                        created=node.createTime.astimezone(timezone.utc))


def _already(fault: Any, target: str) -> bool:
    return isinstance(fault, vim.fault.InvalidPowerState) and fault.existingState == target


def _humanize(wsdl_name: str) -> str:
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", wsdl_name).lower()
    return words[0].upper() + words[1:] if words else wsdl_name


def fault_text(fault: Any) -> str:
    """One sentence for a vSphere fault."""
    if isinstance(fault, vim.fault.InvalidPowerState) and fault.existingState:
        return f"the VM is {fault.existingState}"
    if isinstance(fault, vim.fault.ToolsUnavailable):
        return "VMware Tools is not running in the guest"
    candidates = [getattr(fault, "msg", None) or ""]
    candidates += [getattr(m, "message", None) or "" for m in getattr(fault, "faultMessage", None) or []]
    for text in candidates:
        text = text.strip()
        if " " in text:  # a sentence, not just a type name
            return text.rstrip(".")
    return _humanize(getattr(type(fault), "_wsdlName", type(fault).__name__))


def _check_capacities(capacities: list[int]) -> None:
    if not capacities:
        raise ValueError("A VM needs at least one disk")
    for size in capacities:
        if size <= 0 or size % 512:
            raise ValueError(f"Disk capacity {size} is not a positive multiple of 512 bytes")
    if len(capacities) > 4 * DISKS_PER_CONTROLLER:
        raise ValueError(f"At most {4 * DISKS_PER_CONTROLLER} disks per VM")


def _config_spec(*, name: str, guest_os: str, datastore: str, capacities: list[int]) -> Any:
    """A VM with a paravirtual SCSI controller per 15 disks and thin disks of the given sizes."""
    changes = []
    controllers = math.ceil(len(capacities) / DISKS_PER_CONTROLLER)
    for bus in range(controllers):
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
            device=vim.vm.device.ParaVirtualSCSIController(
                key=-100 - bus, busNumber=bus, sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing),
        ))
    for i, size in enumerate(capacities):
        bus, slot = divmod(i, DISKS_PER_CONTROLLER)
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
            fileOperation=vim.vm.device.VirtualDeviceSpec.FileOperation.create,
            device=vim.vm.device.VirtualDisk(
                key=-200 - i,
                controllerKey=-100 - bus,
                unitNumber=slot if slot < 7 else slot + 1,
                capacityInKB=math.ceil(size / 1024),
                capacityInBytes=size,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{datastore}]", diskMode="persistent", thinProvisioned=True),
            ),
        ))
    return vim.vm.ConfigSpec(
        name=name,
        guestId=guest_os,
        numCPUs=1,
        memoryMB=1024,
        files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
        deviceChange=changes,
    )
