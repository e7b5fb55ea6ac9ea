"""Connectors to VMware sites: vCenter/ESXi through pyVmomi, and the simulated site.

Plain Python, no Django: the web process, workers and the simulated site's workload runner
all use it. Start from :func:`open_connector`.
"""
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
    UntrustedCertificate,
    VmInfo,
    probe_certificate,
)
from vault.connectors.sites import open_connector

__all__ = [
    "POWER_STATES",
    "POWERED_OFF",
    "POWERED_ON",
    "SUSPENDED",
    "AuthenticationFailed",
    "ConnectorError",
    "DiskInfo",
    "EventInfo",
    "Inventory",
    "NotFound",
    "OperationFailed",
    "SiteConnector",
    "SiteInfo",
    "SnapshotInfo",
    "Unreachable",
    "UntrustedCertificate",
    "VmInfo",
    "open_connector",
    "probe_certificate",
]
