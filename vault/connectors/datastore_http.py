"""Files on a vSphere datastore over its HTTP file interface (``/folder``).

``GET``/``PUT https://<vcenter>/folder/<path>?dcPath=<datacenter>&dsName=<datastore>``,
authorized by the cookie of the connector's SOAP session, on a connection made like the
SOAP ones (same trust, same pinned certificate). The recovery site uploads recovered disks
this way and the failback target writes restored disks this way; both read them back
through :meth:`DatastoreHttp.get` to verify what the datastore really holds.

A VMDK on a datastore is a small text *descriptor* naming its *extents*: for a flat (thick
or thin VMFS) disk one extent, ``<name>-flat.vmdk``, holding the raw image.
:func:`parse_extents` reads them.
"""
from __future__ import annotations

import http.client
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator

from replication.dataplane.storage import StorageError
from vault.connectors.base import ConnectorError, NotFound, OperationFailed, Unreachable, describe_os_error
from vault.connectors.vsphere import VSphereConnector

PIECE = 4 * 1024 * 1024  # bytes per piece read from a download (and per piece uploaded by callers)
DESCRIPTOR_MAX = 64 * 1024  # a descriptor is a few hundred bytes; a bigger .vmdk holds data itself

_EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"', re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Extent:
    access: str  # "RW", "RDONLY" or "NOACCESS"
    sectors: int
    kind: str  # "VMFS" and "FLAT" are raw images; "VMFSSPARSE", "SESPARSE", "SPARSE"... are not
    file: str  # relative to the descriptor's folder


def parse_extents(descriptor: bytes) -> list[Extent]:
    """The extents a VMDK descriptor names, in order (none for an empty or binary file)."""
    text = descriptor.decode("utf-8", errors="replace")
    return [Extent(m.group(1), int(m.group(2)), m.group(3).upper(), m.group(4)) for m in _EXTENT.finditer(text)]


class DatastoreHttp:
    """The datastore file interface of one connected vCenter or ESXi session."""

    def __init__(self, vc: VSphereConnector) -> None:
        self.vc = vc

    @property
    def where(self) -> str:
        return self.vc.where

    def _url(self, datacenter: str, datastore: str, path: str) -> str:
        query = urllib.parse.urlencode({"dcPath": datacenter, "dsName": datastore})
        return f"/folder/{urllib.parse.quote(path)}?{query}"

    def _connection(self) -> http.client.HTTPConnection:
        factory = self.vc._connection_factory()
        return factory(self.vc.host, self.vc.port, context=self.vc._ssl_context(), timeout=max(self.vc.timeout, 300))

    def _headers(self) -> dict[str, str]:
        stub = self.vc._stub
        if stub is None:
            raise ConnectorError(f"Not connected to {self.where}")
        return {"Cookie": stub.cookie} if getattr(stub, "cookie", None) else {}

    def _request(self, method: str, datacenter: str, datastore: str, path: str, *, body: Any = None,
                 length: int | None = None, action: str) -> http.client.HTTPResponse:
        conn = self._connection()
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(length)
        try:
            conn.request(method, self._url(datacenter, datastore, path), body=body, headers=headers,
                         encode_chunked=False)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            detail = describe_os_error(exc) if isinstance(exc, OSError) else str(exc) or "bad HTTP response"
            raise Unreachable(f"{action} failed: lost the connection to {self.where} ({detail})") from None
        except StorageError as exc:  # the body is read from a replica while it is sent
            conn.close()
            raise OperationFailed(f"{action} failed: reading the replica failed: {exc}") from None
        response._lifeboat_conn = conn  # type: ignore[attr-defined]  # closed with the response
        return response

    @staticmethod
    def _finish(response: http.client.HTTPResponse) -> None:
        response.close()
        response._lifeboat_conn.close()  # type: ignore[attr-defined]

    def put(self, datacenter: str, datastore: str, path: str, body: Any, length: int, *, action: str) -> None:
        """Store ``length`` bytes (bytes, or an iterable of pieces) as the file ``path``,
        replacing what it held."""
        response = self._request("PUT", datacenter, datastore, path, body=body, length=length, action=action)
        try:
            response.read()
        finally:
            self._finish(response)
        if response.status not in (200, 201, 204):
            raise OperationFailed(f"{action} failed: the datastore answered HTTP {response.status} {response.reason}")

    def get(self, datacenter: str, datastore: str, path: str, *, action: str) -> Iterator[bytes]:
        """The file's bytes as the datastore serves them now, in pieces of at most ``PIECE``."""
        response = self._request("GET", datacenter, datastore, path, action=action)
        try:
            if response.status == 404:
                raise NotFound(f"{action} failed: {path} is not on datastore {datastore}")
            if response.status != 200:
                raise OperationFailed(f"{action} failed: the datastore answered HTTP {response.status} {response.reason}")
            while True:
                piece = response.read(PIECE)
                if not piece:
                    return
                yield piece
        finally:
            self._finish(response)

    def read_small(self, datacenter: str, datastore: str, path: str, *, limit: int, action: str) -> bytes | None:
        """A small file's bytes (a descriptor), or None when the file is bigger than ``limit``."""
        data = bytearray()
        pieces = self.get(datacenter, datastore, path, action=action)
        try:
            for piece in pieces:
                data += piece
                if len(data) > limit:
                    return None
        finally:
            pieces.close()  # ends the download at once when it is too big
        return bytes(data)

    def exists(self, datacenter: str, datastore: str, path: str) -> bool:
        response = self._request("GET", datacenter, datastore, path, action=f"Checking {path}")
        try:
            return response.status != 404
        finally:
            self._finish(response)
