"""Where replication data lands: cache objects (replication logs, engine state) and replica
disks with snapshots, behind one interface (``base.Storage``) with two backends.

``open_storage(config)`` with ``{"kind": "local", "root": "/path"}`` (the default kind;
optional ``"chunk_bytes"`` for new disks) or ``{"kind": "azure", "connection_string": ...,
"container": ...}``.
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import (
    MAX_PAGE_WRITE,
    SECTOR,
    DiskExists,
    DiskNotFound,
    InvalidRequest,
    NotFound,
    ObjectNotFound,
    SnapshotNotFound,
    Storage,
    StorageError,
)
from .local import DEFAULT_CHUNK_BYTES, LocalStorage

__all__ = [
    "MAX_PAGE_WRITE",
    "SECTOR",
    "DiskExists",
    "DiskNotFound",
    "InvalidRequest",
    "NotFound",
    "ObjectNotFound",
    "SnapshotNotFound",
    "Storage",
    "StorageError",
    "open_storage",
]


def open_storage(config: Mapping[str, Any]) -> Storage:
    """A storage from its configuration; raises ``InvalidRequest`` naming what is wrong."""
    kind = config.get("kind", "local")
    if kind == "local":
        root = config.get("root")
        if not root:
            raise InvalidRequest('local storage needs "root" (a directory path)')
        return LocalStorage(root, chunk_bytes=int(config.get("chunk_bytes", DEFAULT_CHUNK_BYTES)))
    if kind == "azure":
        from .azure import AzureStorage  # noqa: PLC0415 - the Azure SDK loads only where Blob Storage is used

        missing = [k for k in ("connection_string", "container") if not config.get(k)]
        if missing:
            raise InvalidRequest(f"azure storage needs {', '.join(repr(k) for k in missing)}")
        return AzureStorage(config["connection_string"], config["container"])
    raise InvalidRequest(f"unknown storage kind {kind!r} (expected 'local' or 'azure')")
